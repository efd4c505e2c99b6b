"""evaluate.py: every row samples each caption of the shapes world per seed, scores it with the
tracker and reports the means as a markdown table, with every score in a JSON file."""
import json

import pytest

import evaluate
import shapes


def test_each_row_scores_every_caption_per_seed(tmp_path, capsys, tiny_checkpoint):
    ckpt = tiny_checkpoint
    out = tmp_path / "scores.json"
    evaluate.main(["--ckpt", ckpt, "--row", "image model=", "--seeds", "2", "--steps", "2", "--frames", "2",
                   "--size", "16", "--batch-size", "40", "--out", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | motion direction | colour | shape |")
    assert table[2].startswith("| image model | ") and table[2].endswith(" | 96 |")
    result = json.loads(out.read_text())
    scores = result["scores"]["image model"]
    assert len(scores) == 2 * len(shapes.COMBINATIONS)
    assert result["summary"]["image model"]["motion_correct"] == pytest.approx(
        sum(s["motion_correct"] for s in scores) / len(scores))


def test_a_missing_adapter_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--row", f"mine={tmp_path / 'none.safetensors'}"])
    assert e.value.code == 2 and "row 'mine': adapter file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--row", "no-equals-sign"])
    assert "--row takes NAME=ADAPTERS" in capsys.readouterr().err


def test_sr_scores_each_row_against_the_truth_and_end_to_end(tmp_path, capsys):
    """evaluate.py sr: the rows upscale the same clips (downscaled from their 128x128 truth); each cell
    is a mean and one standard error; end to end, stage one's videos are tracked before and after."""
    out = tmp_path / "sr.json"
    evaluate.main(["sr", "--row", "bicubic=bicubic", "--row", "image=", "--seeds", "1", "--steps", "1",
                   "--end-to-end", "bicubic", "--t2v-steps", "2", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| method | PSNR (dB) | SSIM | flicker (levels) | shape |")
    assert lines[2].startswith("| bicubic | 33.") and lines[2].endswith(" | 48 |") and " ± " in lines[2]
    assert lines[3].startswith("| image | ")
    assert lines[5].startswith("| method | shape | colour, whole frame |")
    assert lines[7].startswith("| stage one alone (32x32) | ") and lines[8].startswith("| stage one + bicubic (128x128) |")
    result = json.loads(out.read_text())
    scores = result["scores"]["bicubic"]
    assert len(scores) == len(shapes.COMBINATIONS) and {"psnr", "ssim", "flicker", "colour_clean"} <= scores[0].keys()
    psnr = [s["psnr"] for s in scores]
    assert f"{sum(psnr) / len(psnr):.2f}" in lines[2]


def test_sr_refuses_unknown_rows_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["sr", "--row", "bicubic=bicubic", "--end-to-end", "nope", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "--end-to-end 'nope' is not a row" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["sr", "--row", f"mine={tmp_path / 'none.safetensors'}"])
    assert e.value.code == 2 and "adapter file not found" in capsys.readouterr().err
