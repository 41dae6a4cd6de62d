import json

from click.testing import CliRunner

from pipeline.cli import main


def test_methods_lists_every_method_with_its_scenarios():
    result = CliRunner().invoke(main, ["methods", "--json"])
    assert result.exit_code == 0
    listed = {row["name"]: set(row["scenarios"]) for row in json.loads(result.output)}
    assert {"finetune", "ncm", "joint", "l2p", "diki", "zeroshot"} <= set(listed)
    assert "cil" in listed["l2p"]
    assert {"dcil", "cil", "dil"} <= listed["diki"] and "dcil" in listed["zeroshot"]


def test_config_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("stream: {tasks: []}\ntrain: {batch_sise: 3}\n")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'c.yaml'}: train.batch_sise: Extra inputs are not permitted"]
