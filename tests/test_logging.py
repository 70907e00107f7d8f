"""Console output of a run: a live progress bar on a terminal, plain lines elsewhere; metrics.jsonl always."""

import io
import json

from polmjax.logging import MetricsLogger


def _run(tmp_path, progress):
    console = io.StringIO()
    logger = MetricsLogger(str(tmp_path), total_steps=4, use_tensorboard=False, console=console, progress=progress)
    logger.start(0)
    for step in range(1, 5):
        logger.tick(step)
        if step % 2 == 0:
            logger.log(step, {"loss": 1.0 / step, "learning_rate": 1e-3, "tokens_per_s": 1234.0})
    logger.log(4, {"loss": 0.5}, split="eval")
    logger.close()
    return console.getvalue()


def test_progress_bar_on_a_terminal(tmp_path):
    out = _run(tmp_path, progress=True)
    last = out.split("\r")[-1]  # what the terminal shows at the end
    assert last.startswith("train 4/4 |") and "loss 0.2500" in last and "lr 1.00e-03" in last
    assert "tokens/s 1,234" in last and "<00:00]" in last  # elapsed < remaining (the ETA)
    assert "eval step 4/4  loss 0.5000\n" in out  # printed above the bar, on the same console


def test_plain_lines_elsewhere_and_the_same_metrics_file(tmp_path):
    out = _run(tmp_path, progress=False)
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("[##########..........]  train step 2/4  loss 0.5000")
    assert "eta " in lines[1] and lines[2] == "eval step 4/4  loss 0.5000"
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 4] and rows[2]["split"] == "eval"
