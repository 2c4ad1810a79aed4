"""``output.probability``: a uint8 COG of building probability beside the mask, from the same pass
(real GDAL, real HDF5, the random-weight unit gallery, one process). The unit gallery's untrained
networks give every pixel a probability between 0.446 and 0.452, so threshold 0.449 makes about
half of the pixels buildings: the mask and the probability COG must agree pixel by pixel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from osgeo import gdal

from resflow_mpi.io.export import (PROBABILITY_NODATA, OutputRecord, dequantize_probability,
                                   quantize_probability)
from resflow_mpi.io.maskstore import MaskReader
from resflow_mpi.io.naming import MASK, PROBABILITY, output_file_name
from tests.integration.test_outputs_belong_to_store import LOW, config, read, resflow

gdal.UseExceptions()


def test_quantization_round_trip_and_nodata() -> None:
    prob = np.array([[0.0, 0.25, 0.5], [0.999, 1.0, 0.7]], np.float16)
    nodata = np.array([[False, False, False], [False, False, True]])
    q = quantize_probability(prob, nodata)
    assert q.dtype == np.uint8 and q.tolist() == [[0, 64, 127], [254, 254, PROBABILITY_NODATA]]
    back = dequantize_probability(q)
    assert np.isnan(back[1, 2])
    assert np.nanmax(np.abs(back - prob.astype(np.float32))) <= 0.5 / 254 + 1e-6


def test_probability_cog_matches_the_mask_and_the_store(tmp_path: Path,
                                                        unit_fixtures: dict[str, Path]) -> None:
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg = config(tmp_path, scene, gallery, output={"probability": True, "quicklooks": True},
                 inference={"threshold": LOW})
    assert resflow("run", str(cfg), "--quiet") == 0
    out = tmp_path / "out"
    mask_tif = out / output_file_name(scene.stem, MASK)
    prob_tif = out / output_file_name(scene.stem, PROBABILITY)
    ds = gdal.Open(str(prob_tif))
    assert ds.GetMetadata("IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    band = ds.GetRasterBand(1)
    assert band.DataType == gdal.GDT_Byte and band.GetNoDataValue() == PROBABILITY_NODATA
    mask_ds = gdal.Open(str(mask_tif))
    assert ds.GetGeoTransform() == mask_ds.GetGeoTransform()
    assert ds.GetProjection() == mask_ds.GetProjection()
    q, mask = read(prob_tif), read(mask_tif)
    assert q.shape == mask.shape
    np.testing.assert_array_equal(q == PROBABILITY_NODATA, mask == 255)
    assert (mask == 255).any() and 0.2 < (mask == 1).mean() < 0.8
    with MaskReader(str(out / "masks.h5")) as r:
        stored = next(p for _, p, _ in r.iter_probability_rows(0, 10_000))
        record = OutputRecord.of_store(r, 0, "buckets")
    np.testing.assert_array_equal(q, quantize_probability(stored, mask == 255))
    # The mask thresholds the float32 probability, the store keeps float16 (spacing 2^-12 here).
    clear = (np.abs(stored.astype(np.float32) - LOW) > 2.0 ** -11) & (mask != 255)
    assert clear.mean() > 0.3
    np.testing.assert_array_equal((mask == 1)[clear], (stored > LOW)[clear])
    assert OutputRecord.of_file(prob_tif) == record == OutputRecord.of_file(mask_tif)
    report = json.loads((out / "run_report.json").read_text())
    assert str(prob_tif) in report["scenes"][0]["outputs"]
    html = (out / "report.html").read_text()
    assert "building probability" in html

    # Without probabilities the store (and its checksum) differ: --restart removes the old COG.
    assert resflow("run", str(cfg), "--quiet", "--restart",
                   "--set", "output.probability=false") == 0
    assert not prob_tif.exists() and mask_tif.exists()


def test_probability_config_is_checked_and_part_of_the_store_identity(tmp_path: Path) -> None:
    import pytest

    from resflow_mpi.config import load_config
    from resflow_mpi.errors import ConfigError
    from tests.conftest import write_config
    path = write_config(tmp_path / "c.yaml", output={"dir": str(tmp_path / "o")})
    with pytest.raises(ConfigError, match="output.probability needs output.geotiff"):
        load_config(str(path), ["output.probability=true", "output.geotiff=false"])
    plain, with_p = load_config(str(path), []), load_config(str(path), ["output.probability=true"])
    assert with_p.keeps_probabilities and not plain.keeps_probabilities
    assert plain.checksum() != with_p.checksum()
    assert load_config(str(path), ["inference.save_probabilities=true"]).checksum() == \
        with_p.checksum()
