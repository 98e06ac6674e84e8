"""Exported ISSTAD (ONNX Runtime, OpenVINO FP32/FP16) matches torch eval on real images; deployment helpers work."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import openvino
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine

from isstad_plugin import Isstad
from isstad_plugin.deploy import main as predict_main
from isstad_plugin.deploy import openvino_config, plan_predictions, predict_paths, prepare, read_rgb
from tests.parity import assert_decisions_agree

# FP16 weights (OpenVINO's compress_to_fp16, which is what anomalib's CompressionType.FP16 does) change the
# outputs by about 1e-3 of their range: measured 1.0e-3 (scores) and 8e-4 (maps) for vit_tiny at 224 px on 20
# magnetic_tile test images (docs/deployment.md); the tolerance leaves 10x room.
FP16_RTOL = 1e-2
OUTPUTS = ("pred_score", "anomaly_map")


@pytest.fixture(scope="module")
def exported(tile_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny ISSTAD trained for one stage-2 epoch on the real slice, exported to ONNX and OpenVINO."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = Isstad(backbone="vit_tiny", image_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                   stage1_epochs=0, stage2_epochs=1)
    datamodule = MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8,
                         num_workers=0)
    engine = Engine(default_root_dir=out, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    onnx_path = engine.export(model=model, export_type=ExportType.ONNX, export_root=out)
    ir_path = engine.export(model=model, export_type=ExportType.OPENVINO, export_root=out)
    files = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))
    images = np.concatenate([prepare(read_rgb(f), (64, 64)) for f in files])
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(images))
    return {"model": model, "onnx": onnx_path, "ir": ir_path, "images": images, "files": files,
            "reference": {k: getattr(reference, k).numpy() for k in (*OUTPUTS, "pred_label", "pred_mask")},
            "root": out}


def assert_matches(outputs: dict, reference: dict, rtol: float) -> None:
    for key in OUTPUTS:
        scale = np.abs(reference[key]).max()
        np.testing.assert_allclose(outputs[key].reshape(reference[key].shape), reference[key], rtol=0,
                                   atol=rtol * scale, err_msg=key)


def test_exported_graph_has_fixed_size_and_dynamic_batch(exported: dict) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    batch, *size = session.get_inputs()[0].shape
    assert isinstance(batch, str) and size == [3, 64, 64]  # a named (dynamic) batch axis, whatever its name
    assert [o.name for o in session.get_outputs()] == ["pred_score", "pred_label", "anomaly_map", "pred_mask"]


def test_onnx_runtime_matches_torch(exported: dict) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": exported["images"]}), strict=True))
    assert_matches(outputs, exported["reference"], rtol=1e-4)
    assert_decisions_agree(outputs, exported["reference"], margin=1e-4)


def test_openvino_fp32_and_fp16_match_torch(exported: dict, tmp_path: Path) -> None:
    import openvino as ov

    core = ov.Core()
    fp16_path = tmp_path / "fp16.xml"
    ov.save_model(core.read_model(exported["ir"]), fp16_path, compress_to_fp16=True)
    for path, rtol in ((exported["ir"], 1e-4), (fp16_path, FP16_RTOL)):
        compiled = core.compile_model(path, "CPU", openvino_config("f32"))  # BF16 CPUs would default to bf16
        result = compiled(exported["images"])
        outputs = {o.any_name: result[o] for o in compiled.outputs}
        assert_matches(outputs, exported["reference"], rtol=rtol)
        assert_decisions_agree(outputs, exported["reference"], margin=rtol)


def test_openvino_inferencer_predicts_files_and_writes_overlays(exported: dict, tmp_path: Path) -> None:
    inferencer = OpenVINOInferencer(exported["ir"], device="CPU", config=openvino_config("f32"))
    single = inferencer.predict(exported["images"][:1])
    np.testing.assert_allclose(single.pred_score.reshape(-1), exported["reference"]["pred_score"][:1], rtol=1e-4)

    folder = exported["files"][0].parent.parent  # test/ with good and defect sub-folders
    rows = predict_paths(exported["ir"], [folder], tmp_path / "overlays")
    assert len(rows) == len(exported["files"])
    scores = {Path(row["image"]): row["pred_score"] for row in rows}
    for index, path in enumerate(exported["files"]):
        assert scores[path] == pytest.approx(float(exported["reference"]["pred_score"][index]), rel=1e-4)
    assert (tmp_path / "overlays" / "predictions.csv").is_file()
    for row in rows:  # overlays mirror the input tree: overlays/test/<kind>/<name>.png
        image = Path(row["image"])
        assert Path(row["overlay"]) == tmp_path / "overlays" / "test" / image.parent.name / image.name
        assert Path(row["overlay"]).is_file()
    assert len(list((tmp_path / "overlays").rglob("*.png"))) == len(rows)


def test_predict_precision_is_explicit(exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 is an option, never the silent default: it runs everywhere (OpenVINO falls back to f32 on CPUs
    without BF16 units) and stays within 2 % of the score range of torch; an unknown precision is refused. One
    precision never reuses another's compiled model: anomalib's inferencer caches them in ./openvino_cache, keyed
    without the precision (bf16 after f32 scored every image 0.0, f32 after bf16 gave bf16's scores)."""
    from isstad_plugin.deploy import ExportedModel

    monkeypatch.chdir(tmp_path)  # where anomalib's inferencer puts its cache folder
    default = ExportedModel(exported["ir"])  # isstad-predict's default
    assert default.inferencer.model.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    expected = exported["reference"]["pred_score"][:4]
    for precision, atol in (("bf16", 0.02), ("f32", 1e-4), ("bf16", 0.02)):  # each after the other's compile
        rows = predict_paths(exported["ir"], exported["files"][:4], tmp_path / precision, precision=precision,
                             overwrite=True)
        np.testing.assert_allclose([row["pred_score"] for row in rows], expected, atol=atol * np.abs(expected).max(),
                                   err_msg=precision)
    with pytest.raises(ValueError, match="precision must be one of f32, bf16, f16, got 'fp64'"):
        openvino_config("fp64")


def test_predict_names_a_missing_input(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict_paths(exported["ir"], [tmp_path / "nowhere"], tmp_path / "out")


def _tree(root: Path, files: list[Path], name: str = "good") -> Path:
    """``root/<name>/`` holding copies of ``files``; returns ``root``."""
    (root / name).mkdir(parents=True)
    for file in files:
        (root / name / file.name).write_bytes(file.read_bytes())
    return root


def test_predict_outputs_never_collide_and_are_never_partial(exported: dict, tmp_path: Path) -> None:
    files = exported["files"][:2]
    first, second = _tree(tmp_path / "a", files), _tree(tmp_path / "b", files)  # a/good/x.png and b/good/x.png
    (first / "good" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert predict_main([str(exported["ir"]), str(first), str(second), "--output", str(out)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{tree}/good/{f.name}" for tree in ("a", "b") for f in files)
    assert not out.with_name("out.partial").exists()

    # a re-run into the non-empty folder is refused before any work, and the folder is kept as it was
    before = sorted(out.rglob("*"))
    assert predict_main([str(exported["ir"]), str(first), "--output", str(out)]) == 2
    assert sorted(out.rglob("*")) == before

    # a run that fails half-way (an unreadable image) leaves no output and the earlier one untouched
    broken = _tree(tmp_path / "broken", files)
    (broken / "good" / "zzz_truncated.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="zzz_truncated"):
        predict_paths(exported["ir"], [broken], out, overwrite=True)
    assert sorted(out.rglob("*")) == before and not out.with_name("out.partial").exists()

    # --overwrite replaces the folder wholly: nothing of the earlier run stays
    assert predict_main([str(exported["ir"]), str(second), "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [f"b/good/{f.name}" for f in files]


def test_predict_lists_skipped_files_and_refuses_name_clashes(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    tree = _tree(tmp_path / "one" / "test", exported["files"][:1])
    (tree / "good" / "readme.md").write_text("x")
    assert predict_main([str(exported["ir"]), str(tree), "--output", str(tmp_path / "out"), "--no-report"]) == 0
    assert not (tmp_path / "out" / "report.html").exists() and not (tmp_path / "out" / "thumbnails").exists()
    captured = capsys.readouterr()
    assert f"skipped (not an image): {tree / 'good' / 'readme.md'}" in captured.err
    assert "1 non-image files skipped" in captured.out
    clash = _tree(tmp_path / "two" / "test", exported["files"][:1])  # another folder named test
    assert predict_main([str(exported["ir"]), str(tree), str(clash), "--output", str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "would both write test/good/" in error and str(clash) in error
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (448, 448)])
def test_predict_resizes_images_as_the_models_were_trained(tile_root: Path, size: tuple[int, int]) -> None:
    """isstad-predict's resize equals the pre-processor's (torchvision, antialiased bilinear) on real images, down
    and up; OpenCV's INTER_AREA, used before, differed by about 1e-3 to 6e-3 per pixel on average."""
    from anomalib.data.utils import read_image

    from isstad_plugin.models.components.pre_processing import resize_only

    transform = resize_only(size).transform
    files = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))
    for path in files:
        reference = transform(read_image(path, as_tensor=True)[None]).numpy()  # as anomalib's datamodules read
        ours = prepare(read_rgb(path), size)
        assert ours.shape == reference.shape == (1, 3, *size)
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4, err_msg=str(path))


def test_file_inputs_of_the_same_name_keep_their_folders(tmp_path: Path) -> None:
    files = [tmp_path / "blowhole" / "000.png", tmp_path / "crack" / "000.png", tmp_path / "crack" / "001.jpg"]
    for file in files:
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(b"")
    names = dict(plan_predictions(files).images)
    assert names == {files[0]: Path("blowhole/000.png"), files[1]: Path("crack/000.png"), files[2]: Path("001.png")}


@pytest.mark.parametrize("scoring", [{"image_score": "max"}, {"image_score": "features", "feature_memory_size": 32}],
                         ids=["calibrated_max", "encoder_features"])
def test_calibrated_hybrid_scoring_exports_to_onnx(scoring: dict, tile_root: Path, tmp_path: Path) -> None:
    """The CPU recipe's scoring (calibrated product score map, error anomaly map) survives export, buffers included;
    so does the image score from the encoder's tokens (its memory bank, filled by the fit's validation)."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = Isstad(backbone="vit_tiny", image_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                   stage1_epochs=0, stage2_epochs=1, anomaly_map_kind="error", image_score_map="product",
                   map_calibration="per_pixel", **scoring)
    datamodule = MVTecAD(root=tile_root, category="magnetic_tile", train_batch_size=8, eval_batch_size=8,
                         num_workers=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    assert model.model.anomaly_map_generator.normal_mean.abs().sum() > 0  # calibrated by the fit's validation
    if scoring["image_score"] == "features":
        assert bool(model.model.feature_memory.fitted) and model.model.feature_memory.bank.abs().sum() > 0
    onnx_path = engine.export(model=model, export_type=ExportType.ONNX, export_root=tmp_path)
    files = sorted((tile_root / "magnetic_tile" / "test").rglob("*.png"))
    images = np.concatenate([prepare(read_rgb(f), (64, 64)) for f in files])
    with torch.no_grad():
        reference = model.eval()(torch.from_numpy(images))
    reference = {k: getattr(reference, k).numpy() for k in (*OUTPUTS, "pred_label", "pred_mask")}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images}), strict=True))
    assert_matches(outputs, reference, rtol=1e-4)
    assert_decisions_agree(outputs, reference, margin=1e-4)


def test_the_report_shows_every_image_in_score_order_in_a_real_browser(exported: dict, tmp_path: Path) -> None:
    """``report.html`` opened by headless Chromium: the gallery holds every image (the unreadable ones too, named as
    such) in score order, flagged first, with the CSV's verdicts; a file name with HTML characters is shown
    literally; the address's #flagged filters; thumbnails are small files beside the page; the page renders."""
    import csv

    from tests.browser import Elements, dump_dom, screenshot

    shift = tmp_path / "shift"
    (shift / "parts").mkdir(parents=True)
    for file in exported["files"][::max(1, len(exported["files"]) // 5)][:5]:  # good and defective parts
        (shift / "parts" / f"{file.parent.name}_{file.name}").write_bytes(file.read_bytes())
    tricky = shift / "parts" / "<img src=x onerror=alert(1)> & \"quoted\" 'x'.png"
    tricky.write_bytes(exported["files"][-1].read_bytes())  # a defective image, under a name full of HTML
    (shift / "parts" / "truncated.png").write_bytes(exported["files"][0].read_bytes()[:300])
    (shift / "parts" / "text.png").write_text("not an image\n")
    out = tmp_path / "out"
    assert predict_main([str(exported["ir"]), str(shift), "--output", str(out), "--skip-unreadable"]) == 0
    with (out / "predictions.csv").open() as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert len(rows) == 8
    assert {Path(image).name for image, row in rows.items() if row["status"].startswith("unreadable")} == \
        {"truncated.png", "text.png"}

    document = Elements(dump_dom(out / "report.html"))
    cards = document.with_class("card")
    names = [attrs["data-image"] for _, attrs, _ in cards]
    assert sorted(names) == sorted(rows)  # every input file, each once
    shown = [text for _, _, text in document.with_class("name")]  # below the input folder, as the overlays
    assert f"shift/parts/{tricky.name}" in shown  # the HTML in the name shown literally, not parsed
    assert not any(attrs.get("src") == "x" for _, attrs, _ in document.found)
    verdicts = [attrs["data-verdict"] for _, attrs, _ in cards]
    for name, verdict in zip(names, verdicts, strict=True):
        row = rows[name]
        expected = "unreadable" if row["status"] != "scored" else ("flagged" if row["pred_label"] == "1" else "passed")
        assert verdict == expected, name
    order = {"flagged": 0, "passed": 1, "unreadable": 2}
    assert [order[v] for v in verdicts] == sorted(order[v] for v in verdicts)  # flagged first, unreadable last
    for verdict in ("flagged", "passed"):
        scores = [float(rows[n]["pred_score"]) for n, v in zip(names, verdicts, strict=True) if v == verdict]
        assert scores == sorted(scores, reverse=True)
    assert "flagged" in verdicts and "passed" in verdicts  # the trained tiny model separates this slice
    for tag, attrs, _ in document.found:  # thumbnails: small JPEGs beside the page, linking to the full overlays
        if tag == "img" and attrs.get("src", "").startswith("thumbnails/"):
            assert (out / unquote(attrs["src"])).stat().st_size < 30_000
    assert sum(1 for tag, attrs, _ in document.found if tag == "a" and (out / unquote(attrs["href"])).is_file()) == 6
    run = {attrs.get("id"): "".join(text) for _, attrs, text in document.found}
    assert str(exported["ir"]) in run["model"] and "OpenVINO on CPU, f32" in run["source"]
    assert run["counts"].startswith("8: ")

    filtered = Elements(dump_dom(out / "report.html", "#flagged")).with_class("card")
    assert all(("hidden" in attrs) == (attrs["data-verdict"] != "flagged") for _, attrs, _ in filtered)

    picture = cv2.imread(str(screenshot(out / "report.html", tmp_path / "report.png")))
    assert picture is not None and picture.shape[:2] == (1000, 1280) and picture.std() > 20  # not a blank page

    # the checkpoint the export came from: the same verdicts, its threshold read from its post-processor
    checkpoint = next(exported["root"].rglob("*.ckpt"))
    assert predict_main([str(checkpoint), str(shift), "--output", str(tmp_path / "torch"), "--skip-unreadable"]) == 0
    with (tmp_path / "torch" / "predictions.csv").open() as handle:
        torch_rows = {row["image"]: row for row in csv.DictReader(handle)}
    assert torch_rows.keys() == rows.keys()
    for image, row in rows.items():  # the same verdicts as the export's, where a score is not at the threshold
        if row["status"] == "scored" and abs(float(row["pred_score"]) - 0.5) > 1e-3:
            assert torch_rows[image]["pred_label"] == row["pred_label"], image
    page = Elements((tmp_path / "torch" / "report.html").read_text())  # the page as written; the browser saw one
    assert len(page.with_class("card")) == len(cards)
    header = {attrs.get("id"): "".join(text) for _, attrs, text in page.found}
    assert "Lightning checkpoint of Isstad" in header["source"] and header["threshold"].startswith("0.5000")
