"""Unit tests for resflow_mpi.models: shapes, presets, specs, bit utilities, batch independence."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from resflow_mpi.models import (PAPER_PARAMETER_COUNTS, PAPER_PARAMETER_TOLERANCE,
                                SEGMENTATION_PRESETS, ConvAutoencoder, assign_buckets,
                                build_feature_extractor, build_from_spec, build_hash_head,
                                build_segmentation, codes_to_bits, count_parameters,
                                hamming_distance, pack_bits, unpack_bits)

torch.set_num_threads(1)

ARCHS = sorted(SEGMENTATION_PRESETS)


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics so eval mode exercises them."""
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(3, 3, 150, 161), (1, 3, 5, 7), (2, 3, 64, 64)])
def test_segmentation_tiny_output_shape_any_size(arch: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_segmentation(arch, "tiny", in_channels=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(*shape))
    assert logits.shape == (shape[0], 1, shape[2], shape[3])
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_segmentation_respects_in_channels(arch: str) -> None:
    model = build_segmentation(arch, "tiny", in_channels=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 5, 33, 40)).shape == (1, 1, 33, 40)
    with pytest.raises(ValueError, match="5"):
        model(torch.randn(1, 3, 33, 40))


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_preset_parameter_count(arch: str) -> None:
    model = build_segmentation(arch, "paper", in_channels=3)
    expected = PAPER_PARAMETER_COUNTS[arch]
    assert abs(count_parameters(model) - expected) <= PAPER_PARAMETER_TOLERANCE[arch] * expected
    assert set(PAPER_PARAMETER_COUNTS) == set(ARCHS) == {"unet", "fcn_resnet", "segnet",
                                                          "deeplabv3"}
    assert max(PAPER_PARAMETER_TOLERANCE[a] for a in ("segnet", "deeplabv3")) <= 0.03


def test_config_arch_choices_are_the_registered_archs() -> None:
    from typing import get_args, get_type_hints

    from resflow_mpi.config import ModelsConfig
    from resflow_mpi.models.segmentation import SEGMENTATION_CLASSES
    hints = get_type_hints(ModelsConfig)
    assert set(get_args(hints["arch"])) == set(SEGMENTATION_CLASSES) == set(ARCHS)
    for arch in ARCHS:
        assert set(get_args(hints["preset"])) == set(SEGMENTATION_PRESETS[arch])


def test_deeplab_auxiliary_head_trains_and_is_off_at_inference() -> None:
    from resflow_mpi.init.segtrain import train_segmenter
    torch.manual_seed(0)
    model = build_segmentation("deeplabv3", "tiny", 3)
    model.train()
    assert len(model.forward_with_aux(torch.randn(2, 3, 40, 40))) == 2
    aux_before = [p.detach().clone() for p in model.aux.parameters()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    y = (rng.random((4, 32, 32)) > 0.5).astype(np.uint8)
    curve = train_segmenter(model, x, y, steps=2, batch_size=2, lr=1e-2, seed=0)
    assert len(curve) == 2 and all(np.isfinite(curve))
    assert any(not torch.equal(a, b) for a, b in zip(aux_before, model.aux.parameters()))
    assert not model.training
    assert len(model.forward_with_aux(torch.randn(1, 3, 40, 40))) == 2  # training outputs
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 1, 40, 40)


def test_presets_grow_with_size() -> None:
    for arch in ARCHS:
        counts = [count_parameters(build_segmentation(arch, preset, 3))
                  for preset in ("tiny", "small")]
        assert counts[0] < counts[1] < PAPER_PARAMETER_COUNTS[arch]


def test_bad_arch_names_the_valid_archs() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_segmentation("vgg", "tiny", 3)
    assert "vgg" in str(excinfo.value)
    for arch in ARCHS:
        assert arch in str(excinfo.value)


def test_bad_preset_names_the_valid_presets() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_segmentation("unet", "huge", 3)
    assert "huge" in str(excinfo.value)
    for preset in ("tiny", "small", "paper"):
        assert preset in str(excinfo.value)


def _models_with_inputs() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(1)
    extractor = build_feature_extractor(in_channels=4, embed_dim=16, input_px=32, width=8)
    return [
        ("unet", build_segmentation("unet", "tiny", 3), torch.randn(4, 3, 70, 45)),
        ("fcn_resnet", build_segmentation("fcn_resnet", "tiny", 3), torch.randn(4, 3, 70, 45)),
        ("segnet", build_segmentation("segnet", "tiny", 3), torch.randn(4, 3, 70, 45)),
        ("deeplabv3", build_segmentation("deeplabv3", "tiny", 3), torch.randn(4, 3, 70, 45)),
        ("feature_extractor", extractor, torch.randn(4, 4, 90, 77)),
        ("hash_head", build_hash_head(extractor.feat_ch, 24, 5), torch.randn(4, 16, 8, 8)),
    ]


MODEL_IDS = ["unet", "fcn_resnet", "segnet", "deeplabv3", "extractor", "hash_head"]


def _as_tuple(output: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


@pytest.mark.parametrize("index", range(6), ids=MODEL_IDS)
def test_build_from_spec_round_trip(index: int) -> None:
    _, original, x = _models_with_inputs()[index]
    _randomise_batchnorm(original)
    spec = json.loads(json.dumps(original.spec))  # what a gallery manifest stores
    assert "kind" in spec and "arch" in spec
    rebuilt = build_from_spec(spec)
    assert type(rebuilt) is type(original)
    assert rebuilt.spec == original.spec
    assert count_parameters(rebuilt) == count_parameters(original)
    rebuilt.load_state_dict(original.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        for got, want in zip(_as_tuple(rebuilt(x)), _as_tuple(original(x))):
            assert torch.equal(got, want)


def test_segmentation_spec_records_preset() -> None:
    spec = build_segmentation("fcn_resnet", "small", 3).spec
    assert spec["kind"] == "segmentation" and spec["arch"] == "fcn_resnet"
    assert spec["preset"] == "small" and spec["in_channels"] == 3


@pytest.mark.parametrize("spec", [
    {"kind": "classifier", "arch": "unet"},
    {"kind": "segmentation", "arch": "pspnet", "in_channels": 3},
    {"kind": "segmentation", "arch": "segnet", "in_channels": 3, "depth": 4},
    {"kind": "hash_head", "arch": "hash_cnn", "feat_ch": 8, "n_bits": 16},
    {"kind": "feature_extractor", "arch": "cem_conv", "in_channels": 3, "colour": True},
])
def test_build_from_spec_rejects_bad_specs(spec: dict) -> None:
    with pytest.raises(ValueError):
        build_from_spec(spec)


@pytest.mark.parametrize("index", range(6), ids=MODEL_IDS)
def test_eval_output_independent_of_batch_mates(index: int) -> None:
    # Bitwise equality does not hold: oneDNN blocks the work differently for N=1 and N=4, which
    # reorders float sums (differences ~1e-7). No batch statistics are involved.
    _, model, x = _models_with_inputs()[index]
    _randomise_batchnorm(model)
    with torch.no_grad():
        batched = _as_tuple(model(x))
        alone = _as_tuple(model(x[:1]))
        again = _as_tuple(model(x))
    for got, want, repeat in zip(alone, batched, again):
        torch.testing.assert_close(got, want[:1], rtol=0, atol=1e-6)
        assert torch.equal(repeat, want)  # deterministic in eval mode


@pytest.mark.parametrize("index", range(6), ids=MODEL_IDS)
def test_channels_last_matches_contiguous(index: int) -> None:
    _, model, x = _models_with_inputs()[index]
    _randomise_batchnorm(model)
    with torch.no_grad():
        want = _as_tuple(model(x))
        model = model.to(memory_format=torch.channels_last)
        got = _as_tuple(model(x.to(memory_format=torch.channels_last)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_feature_extractor_shapes_independent_of_tile_size() -> None:
    extractor = build_feature_extractor(in_channels=3).eval()
    assert extractor.spec["embed_dim"] == 32 and extractor.spec["input_px"] == 64
    with torch.no_grad():
        for tile_px in (40, 64, 257):
            feature_map, embedding = extractor(torch.randn(2, 3, tile_px, tile_px + 3))
            assert feature_map.shape == (2, extractor.feat_ch, 8, 8)
            assert embedding.shape == (2, 32)


def test_feature_extractor_rejects_bad_input_px() -> None:
    for input_px in (8, 48, 0):
        with pytest.raises(ValueError, match="input_px"):
            build_feature_extractor(in_channels=3, input_px=input_px)


def test_autoencoder_reconstructs_pooled_target() -> None:
    torch.manual_seed(2)
    extractor = build_feature_extractor(in_channels=4, input_px=32, width=8)
    autoencoder = ConvAutoencoder(extractor)
    x = torch.randn(3, 4, 100, 75)
    reconstruction, target = autoencoder(x)
    assert reconstruction.shape == target.shape == (3, 4, 32, 32)
    torch.testing.assert_close(target, torch.nn.functional.adaptive_avg_pool2d(x, 32))
    loss = torch.nn.functional.mse_loss(reconstruction, target)
    loss.backward()
    assert extractor.encoder[0][0].weight.grad is not None  # gradients reach the encoder


def test_hash_head_codes_and_classifier() -> None:
    torch.manual_seed(3)
    head = build_hash_head(feat_ch=64, n_bits=20, n_classes=6).eval()
    with torch.no_grad():
        relaxed = head(torch.randn(5, 64, 8, 8) * 10)
        logits = head.classifier(relaxed)
    assert relaxed.shape == (5, 20) and logits.shape == (5, 6)
    assert (relaxed > -1).all() and (relaxed < 1).all()
    bits = codes_to_bits(relaxed)
    assert bits.dtype == torch.uint8
    assert torch.equal(bits.bool(), relaxed > 0)


@pytest.mark.parametrize("n_bits", [1, 7, 8, 13, 64])
def test_pack_bits_matches_numpy(n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    bits = rng.integers(0, 2, size=(9, n_bits), dtype=np.uint8)
    packed = pack_bits(torch.from_numpy(bits))
    assert packed.dtype == torch.uint8
    assert packed.shape == (9, -(-n_bits // 8))
    np.testing.assert_array_equal(packed.numpy(), np.packbits(bits, axis=1))
    np.testing.assert_array_equal(unpack_bits(packed, n_bits).numpy(), bits)
    # bool input (codes_to_bits alternatives) packs the same way
    assert torch.equal(pack_bits(torch.from_numpy(bits).bool()), packed)


def test_hamming_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    codes_a = rng.integers(0, 256, size=(37, 5), dtype=np.uint8)
    codes_b = rng.integers(0, 256, size=(11, 5), dtype=np.uint8)
    bits_a = np.unpackbits(codes_a, axis=1).astype(np.int64)
    bits_b = np.unpackbits(codes_b, axis=1).astype(np.int64)
    expected = np.array([[int(np.sum(a != b)) for b in bits_b] for a in bits_a])
    got = hamming_distance(torch.from_numpy(codes_a), torch.from_numpy(codes_b))
    assert got.shape == (37, 11) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)
    with pytest.raises(ValueError, match="bytes"):
        hamming_distance(torch.from_numpy(codes_a), torch.from_numpy(codes_b[:, :4]))


def test_assign_buckets_nearest_and_ties_to_lowest_index() -> None:
    codes = torch.tensor([[0b0000_0000], [0b1111_1111], [0b1000_0001]], dtype=torch.uint8)
    centroids = torch.tensor([[0b1111_1111],   # far from code 0
                              [0b1100_0000],   # distance 2 from code 0
                              [0b0000_0011],   # distance 2 from code 0: exact tie with index 1
                              [0b1000_0001]], dtype=torch.uint8)
    distances = hamming_distance(codes, centroids)
    assert distances[0, 1] == distances[0, 2] == 2  # the tie is real
    buckets = assign_buckets(codes, centroids)
    assert buckets.dtype == torch.int64
    assert buckets.tolist() == [1, 0, 3]
    # Reversing the tied pair's order must still pick the lower index.
    swapped = centroids[[0, 2, 1, 3]]
    assert assign_buckets(codes, swapped).tolist() == [1, 0, 3]


def test_assign_buckets_many_codes_matches_argmin() -> None:
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 256, (2000, 4), dtype=torch.uint8, generator=generator)
    centroids = torch.randint(0, 256, (16, 4), dtype=torch.uint8, generator=generator)
    distances = hamming_distance(codes, centroids)
    buckets = assign_buckets(codes, centroids)
    chosen = distances.gather(1, buckets[:, None]).squeeze(1)
    assert torch.equal(chosen, distances.min(dim=1).values)
    # among equally near centroids none has a lower index than the chosen one
    index = torch.arange(16).expand_as(distances)
    lowest_nearest = torch.where(distances == chosen[:, None], index, 16).min(dim=1).values
    assert torch.equal(lowest_nearest, buckets)


def test_compute_layer_imports_without_mpi_hdf5_gdal_spark() -> None:
    code = textwrap.dedent("""
        import sys
        for name in ("mpi4py", "h5py", "osgeo", "pyspark"):
            sys.modules[name] = None
        import resflow_mpi.models
        import resflow_mpi.tiling
        import resflow_mpi.stages  # the three stages: compute only, no I/O or MPI
        import resflow_mpi.scenegen  # synthetic scene rendering: numpy only
        image, mask = resflow_mpi.scenegen.render_window(
            resflow_mpi.scenegen.archive_specs("tiny")[0], 0, 0, 16, 8)
        assert image.shape == (3, 8, 16) and mask.shape == (8, 16)
        model = resflow_mpi.models.build_segmentation("unet", "tiny", 3)
        print("ok", resflow_mpi.models.count_parameters(model))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
