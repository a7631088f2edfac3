"""The synthetic lesion repertoire: families, contrasts, healthy variation, seeding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_whatishealthy.core import synthetic
from napari_whatishealthy.core.synthetic import FAMILIES, make_case, synthesise

VOXEL = 3.0  # 80 x 80 x 52: fast, yet fine enough for ventricles and small foci


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_makes_labelled_lesions_of_its_own_kind(family):
    kind = "subtle" if family == "isointense" else "typical"
    images, seg, _, info = make_case("c", 11, kind, VOXEL, families=(family,))
    assert set(info.families) == {family}
    assert info.lesion_voxels == int((seg > 0).sum()) > 0
    assert sum(lesion.voxels for lesion in info.lesions) >= info.lesion_voxels
    labels = set(np.unique(seg)) - {0}
    assert labels <= ({1, 2, 4} if family == "tumour" else {2})
    assert all(np.isfinite(a).all() and a.min() >= 0 for a in images.values())


def _tissue_mean(images, seg, modality):
    """Mean intensity in the lesion and in a 2-voxel ring of tissue around it."""
    from scipy import ndimage

    lesion = seg > 0
    ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion & (images["flair"] > 0)
    return float(images[modality][lesion].mean()), float(images[modality][ring].mean())


def test_typical_lesions_are_bright_in_flair_and_isointense_ones_are_not():
    images, seg, _, _ = make_case("c", 4, "typical", VOXEL, families=("multifocal",))
    lesion, rest = _tissue_mean(images, seg, "flair")
    assert lesion > 1.3 * rest
    images, seg, _, _ = make_case("c", 4, "subtle", VOXEL, families=("isointense",))
    lesion, rest = _tissue_mean(images, seg, "flair")
    assert lesion < 1.15 * rest  # FLAIR barely changes ...
    lesion_t2, rest_t2 = _tissue_mean(images, seg, "t2")
    lesion_t1, rest_t1 = _tissue_mean(images, seg, "t1")
    assert lesion_t2 > 1.2 * rest_t2 and lesion_t1 < 0.85 * rest_t1  # ... T2 and T1 do


def test_tumour_oedema_is_not_cut_flat_by_its_box():
    """The tumour's bounding box reaches past the widest outline the wobble allows."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        anatomy, _, _ = synthetic._subject(rng, VOXEL)
        parts, _ = synthetic._tumour(rng, anatomy, "typical")
        union = np.zeros(parts[0].mask.shape, bool)
        for part in parts:
            union |= part.mask
        assert union.any()
        for axis, s in enumerate(parts[0].box):
            faces = np.moveaxis(union, axis, 0)
            assert s.start == 0 or not faces[0].any()
            assert s.stop == anatomy.shape[axis] or not faces[-1].any()


def test_healthy_variation_enlarges_ventricles_and_is_recorded():
    infos = [make_case("c", seed, "healthy", VOXEL)[3] for seed in range(4)]
    assert any(i.ventricle_dilation_mm > 0 for i in infos)
    assert any(i.atrophy > 0 for i in infos) and any(i.atrophy == 0 for i in infos)
    # A larger dilation means more CSF-dark FLAIR inside the brain, everything else equal.
    big = max(infos, key=lambda i: i.ventricle_dilation_mm)
    assert big.ventricle_dilation_mm >= 2.0


def test_same_seed_same_case_and_manifest_records_the_generator(tmp_path):
    first = make_case("c", 9, "typical", 4.0)
    second = make_case("c", 9, "typical", 4.0)
    assert np.array_equal(first[1], second[1])
    assert all(np.array_equal(first[0][m], second[0][m]) for m in first[0])
    synthesise(tmp_path, 2, seed=3, voxel_size=6.0, healthy_fraction=0.0, families=("wedge",))
    manifest = json.loads((tmp_path / "cases.json").read_text())
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert manifest["families"] == ["wedge"]
    assert all(set(c["families"]) == {"wedge"} for c in manifest["cases"])


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown lesion families"):
        make_case("c", 1, "typical", 6.0, families=("blob",))
