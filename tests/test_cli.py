"""The command line is generated from the job configs: every setting is a flag with help, every
flag an error message names exists, and ``--print-config`` output reads back as ``--config``."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from salient.jobs.cli import COMMANDS, _config_class, _storage_flags, build_parser, main
from salient.jobs.flags import field_docs, flag_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("salient_root", "pipeline", "store", "trainer", "jobs")
# ours are hyphenated; --snake_case flags are the official codes' (``--pred_ratio``)
FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")
# Flags of other programs that messages quote (`ray start --head --port 6379`).
FOREIGN = {"--port", "--logdir"}  # `tensorboard --logdir RUN`


def _option_strings(name: str) -> set[str]:
    parser = build_parser(name)
    return {opt for action in parser._actions for opt in action.option_strings}


def _all_flags() -> set[str]:
    return set().union(*(_option_strings(name) for name in COMMANDS)) | {"--version"}


def _strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_config_field_is_a_flag_with_help(name):
    cls = _config_class(COMMANDS[name])
    options, docs = _option_strings(name), field_docs(cls)
    positional = {a.dest for a in build_parser(name)._actions if not a.option_strings}
    for field in dataclasses.fields(cls):
        if field.metadata.get("positional"):
            assert field.name in positional
        else:
            assert flag_name(field) in options, field.name
        assert len(docs.get(field.name, "")) > 15, f"{name}: {field.name} has no real help"


def test_every_flag_named_in_the_package_exists():
    known = _all_flags() | FOREIGN
    missing = {}
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for text in _strings(path):
                for flag in FLAG.findall(text):
                    if f"--{flag}" not in known:
                        missing.setdefault(f"--{flag}", path.name)
    assert not missing, f"flags named in messages but not defined: {missing}"


def test_print_config_reads_back_as_config(tmp_path, capsys):
    args = ["train", "--data", "d", "--store", "s", "--strategy", "gpa", "--epochs", "3"]
    args += ["--strategy-option", "hard=[0, 0.4]", "--print-config"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    body = json.loads(printed)
    assert body["epochs"] == 3 and body["strategy_options"] == {"hard": [0, 0.4]}
    (tmp_path / "c.json").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "c.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


def test_flags_override_a_yaml_config(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("data: d\nstrategy: random\nepochs: 7\nbatch_size: 8\n")
    assert (
        main(["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2", "--print-config"])
        == 0
    )
    body = json.loads(capsys.readouterr().out)
    assert (body["epochs"], body["batch_size"], body["strategy"]) == (2, 8, "random")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--strategy", "random"], "train needs --data"),
        (["train", "--data", "d", "--mask-ratio", "0.7"], r"must be < 1 \(got 0.7 \+ 0.4\)"),
        (["train", "--data", "d", "--config", "/nonexistent.yaml"], "cannot read --config"),
        (["bench"], "bench needs WHAT"),
        (["bench", "quality", "--seeds", "0"], r"--seeds must be a positive integer \(got 0\)"),
        (["bench", "quality", "--n", "8"], r"--n must be an integer >= 16 \(got 8\)"),
        (["demo", "--batch-size", "-1"], r"--batch-size must be a positive integer \(got -1\)"),
        (["demo", "--workers", "0"], r"--workers must be a positive integer \(got 0\)"),
        (["demo", "--train-size", "-5"], r"--train-size must be a positive integer"),
        (["demo", "--n", "5"], r"--n must be an integer >= 16 \(got 5\)"),
        (["ingest", "--demo"], "needs SRC and OUT"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def test_unknown_config_keys_are_named(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "epoks": 3}))
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 2
    assert "sets 'epoks', which this job does not have" in capsys.readouterr().err


def test_recipe_then_config_then_flags(tmp_path, capsys):
    """--recipe fills a paper's values; a printed config of it reads back; flags win."""
    base = ["train", "--data", "d", "--store", "s"]
    assert main([*base, "--recipe", "amt-simmim", "--print-config"]) == 0
    printed = capsys.readouterr().out
    body = json.loads(printed)
    assert (body["mask_ratio"], body["throw_ratio"], body["mask_unit"]) == (0.44, 0.26, 32)
    (tmp_path / "r.json").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "r.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert main([*base, "--recipe", "amt-simmim", "--epochs", "5", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 5


def test_a_continue_command_keeps_the_storage_options_it_was_given():
    argv = ["--data", "s3://b/d", "--storage-option", "endpoint_url=http://h:9000"]
    argv += ["--epochs", "4", "--storage-option=key=K"]
    assert _storage_flags(argv) == [
        "--storage-option", "endpoint_url=http://h:9000", "--storage-option=key=K",
    ]  # fmt: skip
    assert _storage_flags(["--data", "d", "--storage-option"]) == []  # no value: argparse's


# Every job's parser, --help and flag errors load none of torch, timm, torchvision or Ray
# (docs/ARCHITECTURE.md, "Start-up").
_PROBE = """
import sys
from salient.jobs.cli import build_parser, main
build_parser({name!r}).format_help()
try:
    main([{name!r}, "--no-such-flag"])
except SystemExit as stop:
    assert stop.code == 2, stop.code
print(sorted(m for m in ("torch", "timm", "torchvision", "ray") if m in sys.modules))
"""


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_parser_and_a_bad_flag_load_no_torch_timm_or_ray(name):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(name=name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "unrecognized arguments: --no-such-flag" in done.stderr
    assert done.stdout.strip() == "[]", f"salient {name}'s parser loaded {done.stdout.strip()}"


def test_train_print_config_without_strategy_options_loads_no_torch():
    code = (
        "import sys\nfrom salient.jobs.cli import main\n"
        "assert main(['train', '--data', 'D', '--store', 'S', '--print-config']) == 0\n"
        "print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "[]", done.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["refresh", "--data", "{missing}", "--store", "s.zarr", "--teacher", "t.pt"], "--data"),
        (["train", "--data", "{data}", "--strategy", "random", "--val", "{missing}"], "--val"),
        (["eval", "--checkpoint", "c.pt", "--data", "{missing}", "--val", "{data}"], "--data"),
        (
            ["inspect", "--store", "s.zarr", "--data", "{data}/shard-000000.tar", "--out", "r"],
            "--data",
        ),
        (["compare", "--data", "{data}", "--val", "{missing}"], "--val"),
    ],
)
def test_a_missing_local_dataset_is_one_line_naming_its_flag_before_torch_loads(
    demo_data, tmp_path, argv, flag
):
    argv = [a.format(missing=tmp_path / "nope", data=demo_data) for a in argv]
    code = (
        "import sys\nfrom salient.jobs.cli import main\n"
        f"code = main({argv!r})\n"
        "print(code, sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"salient {argv[0]}: error: {flag}: "), line
    assert ("does not exist" in line or "holds no manifest.json" in line) and len(line) < 300


def test_a_closed_pipe_ends_quietly():
    """`salient … --print-config | head -1`: the reader is gone before the config is printed."""
    argv = [sys.executable, "-m", "salient.jobs.cli", "gc", "--store", "s.zarr", "--print-config"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the interpreter is up: the first write meets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
