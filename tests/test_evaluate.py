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
