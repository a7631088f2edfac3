"""Model spec and checkpoints (safe loading, clear refusals) and the model registry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_checkpoint, tiny_spec

from napari_whatishealthy.core import registry
from napari_whatishealthy.core.model import (
    SPEC_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ModelSpec,
    build_model,
    checkpoint_hash,
    load_checkpoint,
    load_spec,
    save_checkpoint,
)


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([0, 500, 990])
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        return model(x, t, labels)


def test_spec_json_round_trip():
    spec = tiny_spec()
    again = ModelSpec.from_dict(json.loads(spec.to_json()))
    assert again == spec
    assert again.network.channels == (8, 16)  # tuples survive JSON


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny_spec()).eval()
    save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [WEIGHTS_FILE, SPEC_FILE]
    loaded = load_checkpoint(tmp_path / "ck")
    assert not loaded.training
    assert loaded.spec == model.spec
    assert torch.equal(_outputs(model), _outputs(loaded))


def test_null_label_has_a_zero_context_token(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    emb = model.label_embedding.weight
    assert torch.all(emb[model.null_label] == 0)
    assert not torch.all(emb[0] == 0)


def test_pickled_weights_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    model = load_checkpoint(folder)
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)  # a pickle under the safetensors name
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(folder)


def test_truncated_weights_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(folder)


def test_spec_that_does_not_fit_the_weights_is_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec["network"]["channels"] = [8, 32]
    (folder / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not match the spec"):
        load_checkpoint(folder)


@pytest.mark.parametrize(
    "text, match",
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
     ('{"format": "other/9"}', "unknown spec format"), ('{"bogus_field": 1}', "unknown")],
)
def test_bad_specs_are_refused(tmp_path, text, match):
    folder = make_checkpoint(tmp_path / "ck")
    (folder / SPEC_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=match):
        load_spec(folder)


def test_missing_files_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "ck")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="weights file missing"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no model spec"):
        load_checkpoint(tmp_path)


def test_hash_identifies_the_weights(tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=0)
    b = make_checkpoint(tmp_path / "b", seed=0)
    c = make_checkpoint(tmp_path / "c", seed=1)
    assert checkpoint_hash(a) == checkpoint_hash(b)
    assert checkpoint_hash(a) != checkpoint_hash(c)
    assert len(checkpoint_hash(a)) == 64


# --------------------------------------------------------------------------------------------
# registry


def test_bundled_models_lists_only_checkpoints(tmp_path, monkeypatch):
    models = tmp_path / "models"
    make_checkpoint(models / "default")
    (models / "empty").mkdir()
    (models / "README.md").write_text("card")
    monkeypatch.setattr(registry, "MODELS_DIR", models)
    assert list(registry.bundled_models()) == ["default"]
    assert registry.resolve_model(None) == (models / "default").resolve()
    assert registry.resolve_model("default") == (models / "default").resolve()


def test_missing_default_model_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "nothing")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="default model is not bundled"):
        registry.resolve_model("default")
    with pytest.raises(CheckpointError, match="no such model"):
        registry.resolve_model("nonexistent-model")


def test_resolve_model_accepts_folder_files_and_train_output(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "checkpoint")
    expected = (run / "checkpoint").resolve()
    assert registry.resolve_model(run) == expected
    assert registry.resolve_model(run / "checkpoint") == expected
    assert registry.resolve_model(run / "checkpoint" / SPEC_FILE) == expected
    assert registry.resolve_model(run / "checkpoint" / WEIGHTS_FILE) == expected
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a single file"):
        registry.resolve_model(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        registry.resolve_model(tmp_path)


def test_model_cache_reuses_and_reloads_when_the_file_changes(tmp_path):
    registry.clear_model_cache()
    folder = make_checkpoint(tmp_path / "ck", seed=0)
    m1, spec1, h1 = registry.load_model_cached(folder, "cpu")
    m2, _, h2 = registry.load_model_cached(str(folder), "cpu")
    assert m1 is m2 and h1 == h2 == checkpoint_hash(folder)
    assert spec1.image_size == 16
    assert not any(p.requires_grad for p in m1.parameters())
    make_checkpoint(folder, seed=5)  # retrained into the same folder
    m3, _, h3 = registry.load_model_cached(folder, "cpu")
    assert m3 is not m1 and h3 != h1
    x = _outputs(m3)
    assert np.isfinite(x.numpy()).all()
    registry.clear_model_cache()


def test_saved_checkpoint_files_are_not_private(tmp_path):
    import os
    import stat

    from conftest import make_checkpoint

    old = os.umask(0o022)
    try:
        folder = make_checkpoint(tmp_path / "ckpt")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "spec.json"):
        mode = stat.S_IMODE((folder / name).stat().st_mode)
        assert mode & 0o044 == 0o044, oct(mode)  # group and others can read, as for any output
