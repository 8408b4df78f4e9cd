"""Every command in the README's bash and python code blocks runs as written, or is dry-run where it needs
a cluster or an install (issue 17: docs that match the code). A command no handler knows fails the test:
a new README command needs a way to be checked here."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_train.cli import main as cli_main

from .procs import REPO, free_port, run

README = REPO / "README.md"
BIN = Path(sys.executable).parent


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    blocks, language, lines = [], None, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if language is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    return blocks


def code_blocks(language: str) -> list[str]:
    return [text for lang, text in fenced_blocks() if lang == language]


def bash_commands() -> list[str]:
    """One entry per command line; comments dropped, `a && b` split."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_commands_are_all_known():
    assert len(bash_commands()) >= 15
    for command in bash_commands():
        assert handler_for(command) is not None, f"README command with no check: {command}"


def handler_for(command: str):
    words = shlex.split(command)
    program = Path(words[0]).name
    if program == "make":
        return "make"
    if program == "pip":
        return "pip"
    if program in ("dist-train", "torchrun", "accelerate") or words[:3] == [".venv/bin/python", "-m", "pytest"]:
        return program if program != "python" else "pytest"
    if program in ("python", "python3"):
        return "python"
    if program in ("sbatch", "kubectl", "sky", "bash") or words[0].startswith("launch/"):
        return "template"
    return None


def _cluster_overrides(tmp_path: Path) -> list[str]:
    return ["train.max_steps=2", f"output_dir={tmp_path / 'run'}", "train.start_over=true"]


@pytest.mark.parametrize("command", bash_commands())
def test_readme_command(command, tmp_path, capsys):
    words = shlex.split(command)
    kind = handler_for(command)
    program = Path(words[0]).name
    if kind == "make":  # installs and full runs: the recipe must exist and expand (make -n)
        result = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return
    if kind == "pytest":
        return  # the suite itself
    if kind == "pip":  # an install needs the network: the extras it names must exist
        import tomllib

        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in words[words.index("-e") + 1 :]:
            for extra in re.findall(r"\[(.*?)\]", spec)[0].split(",") if "[" in spec else []:
                assert extra in extras, f"{command}: no extra [{extra}] in pyproject.toml"
        return
    if kind == "python":
        if words[1:3] == ["-m", "venv"]:
            assert "all" in (REPO / "pyproject.toml").read_text()
            return
        # a script of the repository: it must start and explain itself
        result = run([sys.executable, words[1], "--help"], timeout=120)
        assert "usage" in result.stdout.lower()
        return
    if kind == "template":
        files = [REPO / w for w in words if (REPO / w).is_file()]
        assert files, f"{command}: names no file of the repository"
        for file in files:
            if file.suffix in (".yaml", ".yml"):
                assert list(yaml.safe_load_all(file.read_text()))
            else:
                assert subprocess.run(["bash", "-n", str(file)]).returncode == 0
        return
    args = [w for w in words[1:]]
    if program == "dist-train":
        args = [a.replace("data/digits", str(tmp_path / "digits")) if a.startswith(("--out", "data/")) else a for a in args]
        if args[:1] == ["train"]:
            args += _cluster_overrides(tmp_path)
        if args[:1] == ["launch"]:
            args.insert(1, "--dry-run")
        if args == ["--help"]:
            with pytest.raises(SystemExit) as exit_info:
                cli_main(args)
            assert exit_info.value.code == 0 and "train.global_batch_size" in capsys.readouterr().out
            return
        assert cli_main(args) == 0
        return
    # torchrun / accelerate: what the workers would run, checked for that world size without starting them
    nproc = 2
    if program == "accelerate":
        config_file = REPO / words[words.index("--config_file") + 1]
        nproc = yaml.safe_load(config_file.read_text())["num_processes"]
        words = ["torchrun", *words[words.index("-m"):]]
    else:
        nproc = int(words[words.index("--nproc_per_node") + 1])
    module_args = words[words.index("-m") + 2 :]
    assert module_args[0] == "train"
    config = module_args[1] if module_args[1] != "CONFIG" else "configs/cnn_digits.yaml"
    assert cli_main(["launch", "--dry-run", "--nproc-per-node", str(nproc), config, *module_args[2:]]) == 0


@pytest.mark.slow
def test_readme_python_blocks_compile_and_the_api_examples_two_commands_run_one_after_the_other(tmp_path):
    for block in code_blocks("python"):
        compile(block, "README.md", "exec")  # fragments (a model's methods) must at least be valid Python
    (example,) = [block for block in code_blocks("python") if "dist_train.train(" in block]
    script = tmp_path / "train_mine.py"
    script.write_text(example)
    first = run([sys.executable, str(script)], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=300)
    correct, exit_code = first.stdout.strip().splitlines()[-1].split()
    assert float(correct) > 0.8 and exit_code == "0", first.output[-3000:]
    assert (tmp_path / "runs" / "mine" / "metrics.jsonl").exists()
    # The second command the README names, right after: under torchrun every process runs the script, and
    # dist_train refuses datasets that differ between ranks, so this also proves the example's data is seeded.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    second = run([*torchrun, str(script)], cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, timeout=300)
    assert "resumed from" in second.output and "refused" not in second.output, second.output[-3000:]
    printed = [line.split() for line in second.stdout.splitlines() if len(line.split()) == 2]  # every process prints its summary
    assert printed == [[correct, "0"]] * 2, second.output[-3000:]


def test_readme_cli_summary_names_real_commands_and_sources():
    """The CLI block (usage lines with placeholders): each subcommand exists and the sources it lists are real."""
    from dist_train.data import SOURCES

    (usage,) = [b for b in code_blocks("") if b.startswith("dist-train train CONFIG")]
    for line in usage.splitlines():
        words = line.split()
        if words[0] != "dist-train":
            continue
        with pytest.raises(SystemExit) as exit_info:
            cli_main([*words[1:3 if words[1] == "data" else 2], "--help"])
        assert exit_info.value.code == 0, line
        listed = re.search(r"\(([\w, ]+)\)$", line)
        if "prepare" in line and listed:
            names = [n.strip() for n in listed.group(1).split(",")]
            assert set(names) <= set(SOURCES), f"README names sources that do not exist: {set(names) - set(SOURCES)}"
