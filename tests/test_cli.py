"""The command line: one-line errors for bad input, and the verbs working end to end."""
import subprocess
import sys

import pytest

from encdec.cli import main

from test_train import make_reverse_task


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "encdec", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(result, pattern):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encdec: error:"), result.stderr
    assert pattern in lines[0], lines[0]


def test_help_explains_each_verb():
    result = run_cli("--help")
    for verb in ("train", "translate", "evaluate", "serve", "average", "quickstart"):
        assert verb in result.stdout
    assert "--beam" in run_cli("translate", "--help").stdout


@pytest.mark.parametrize("text, message", [
    ("data: {train: a.tsv, dev: b.tsv}\ntrian: {}\n", "trian: unknown option"),
    ("data: {train: a.tsv, dev: b.tsv}\ntrain: {metric: blue}\n", "train.metric: 'blue' is not allowed"),
    ("data: {train: a.tsv}\n", "data.dev: required"),
    ("data: [unclosed\n", "not valid YAML"),
    ("data: {train: a.tsv, dev: b.tsv, src_tokenizer: {kind: char, case: title}}\n", "case: 'title' is not allowed"),
    ("data: {train: a.tsv, dev: b.tsv, src_tokenizer: {case: upper}}\n", "applies to char and symbol tokenizers only"),
    ("data: {train: a.tsv, dev: b.tsv}\ntrain: {warmup: -5}\n", "train.warmup: must be >= 0, got -5"),
    ("data: {train: a.tsv, dev: b.tsv}\ntrain: {clip_norm: -1}\n", "train.clip_norm: must be >= 0"),
    ("data: {train: a.tsv, dev: b.tsv}\ntrain: {eps: 0}\n", "train.eps: must be > 0"),
    ("data: {train: a.tsv, dev: b.tsv}\ntrain: {betas: [0.9, 1.5]}\n", "train.betas: expected two numbers in [0, 1)"),
])
def test_bad_configs_give_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["train", str(config), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bad_set_override_and_missing_data(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: [{tmp_path}/x.src, {tmp_path}/x.tgt], dev: {tmp_path}/d.tsv}}\n")
    assert main(["train", str(config), "--set", "train.lr"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["train", str(config), "--run", str(tmp_path / "run")]) == 2
    assert "x.src" in capsys.readouterr().err


def test_mismatched_training_files_are_reported(tmp_path, capsys):
    make_reverse_task(tmp_path, n_train=50, n_dev=5)
    (tmp_path / "train.tgt").write_text("only one line\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: [{tmp_path}/train.src, {tmp_path}/train.tgt], "
                      f"dev: [{tmp_path}/dev.src, {tmp_path}/dev.tgt], src_tokenizer: {{kind: char}}}}\n")
    assert main(["train", str(config), "--run", str(tmp_path / "run")]) == 2
    assert "ends after 1 lines" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["translate", "--model", "m", "--beam", "0"], "argument --beam: must be >= 1, got 0"),
    (["translate", "--model", "m", "--n-best", "-1"], "argument --n-best: must be >= 1, got -1"),
    (["evaluate", "--model", "m", "--src", "s", "--ref", "r", "--batch-tokens", "many"],
     "argument --batch-tokens: expected an integer, got 'many'"),
    (["translate", "--model", "m", "--max-len-ratio", "0"], "argument --max-len-ratio: must be > 0, got 0"),
    (["serve", "--model", "m", "--max-wait-ms", "-1"], "argument --max-wait-ms: must be >= 0, got -1"),
    (["g2p", "--beam", "0", "hello"], "argument --beam: must be >= 1, got 0"),
    (["average", "--run", "r", "--last", "0", "--out", "o"], "argument --last: must be >= 1, got 0"),
])
def test_bad_numbers_on_the_command_line_are_refused(capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


@pytest.mark.parametrize("kind", ["sentencepiece", "char"])
@pytest.mark.parametrize("src, tgt", [("", ""), ("a\n\n", "\nb\n")])
def test_training_data_without_text_is_reported(tmp_path, capsys, kind, src, tgt):
    (tmp_path / "t.src").write_text(src)
    (tmp_path / "t.tgt").write_text(tgt)
    (tmp_path / "d.tsv").write_text("a\tb\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"data: {{train: [{tmp_path}/t.src, {tmp_path}/t.tgt], dev: {tmp_path}/d.tsv, "
                      f"src_tokenizer: {{kind: {kind}}}}}\n")
    assert main(["train", str(config), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.train: no pair with text on both sides" in err[0] and "t.src" in err[0], err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    make_reverse_task(folder, n_train=300, n_dev=10)
    config = folder / "c.yaml"
    config.write_text(f"data: {{train: [{folder}/train.src, {folder}/train.tgt], "
                      f"dev: [{folder}/dev.src, {folder}/dev.tgt], src_tokenizer: {{kind: char}}, max_len: 32}}\n"
                      "model: {d_model: 32, heads: 2, ff: 64, encoder_layers: 1, decoder_layers: 1, max_len: 32}\n"
                      "train: {max_tokens: 500, max_steps: 4, validate_every: 2, metric: exact, threads: 1}\n")
    result = run_cli("train", config, "--run", folder / "run", "--set", "train.lr=0.001")
    assert result.returncode == 0, result.stderr
    return folder


def test_translate_evaluate_average(trained):
    model = trained / "run" / "best"
    result = run_cli("translate", "--model", model, "--beam", "2", stdin="abc\ndef\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    nbest = run_cli("translate", "--model", model, "--beam", "3", "--n-best", "3", stdin="abc\n")
    assert len(nbest.stdout.strip().split("\t")) == 6, "3 outputs, each with its score"
    result = run_cli("evaluate", "--model", model, "--src", trained / "dev.src", "--ref", trained / "dev.tgt")
    assert result.returncode == 0 and "BLEU" in result.stdout and "chrF" in result.stdout, result.stderr
    result = run_cli("average", "--run", trained / "run", "--last", "2", "--out", trained / "avg")
    assert result.returncode == 0 and (trained / "avg" / "model.safetensors").exists(), result.stderr


def test_unknown_characters_warn_and_over_long_input_errors(trained):
    model = trained / "run" / "best"
    result = run_cli("translate", "--model", model, "--beam", "1", stdin="abZ\n")
    assert result.returncode == 0 and "unknown symbols mapped to <unk>: Z" in result.stderr
    assert_one_line_error(run_cli("translate", "--model", model, stdin="a" * 40 + "\n"),
                          "input 1 has 41 tokens but the model takes at most 31")


def test_missing_and_corrupt_models_give_one_line(trained, tmp_path):
    assert_one_line_error(run_cli("translate", "--model", tmp_path / "nothing", stdin="abc\n"), "no config.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (trained / "run" / "best").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(run_cli("translate", "--model", broken, stdin="abc\n"), "model.safetensors")
    mismatch = run_cli("evaluate", "--model", trained / "run" / "best", "--src", trained / "dev.src",
                       "--ref", trained / "train.tgt")
    assert_one_line_error(mismatch, "must align")


def test_ensembles_of_model_folders(trained, tmp_path):
    import json

    from encdec import load

    best, first = trained / "run" / "best", sorted((trained / "run" / "checkpoints").glob("step-*[0-9]"))[0]
    texts = ["abc", "defg", "ab"]
    assert load([best, best]).translate(texts, beam=2) == load(best).translate(texts, beam=2)
    result = run_cli("translate", "--model", best, first, "--beam", "2", stdin="abc\ndef\n")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2, result.stderr
    assert result.stdout.splitlines() == load([best, first]).translate(["abc", "def"], beam=2)
    other = tmp_path / "other"  # the same model with two target symbols swapped: another tokenizer
    other.mkdir()
    for f in best.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    document = json.loads((other / "tgt.tokenizer").read_text(encoding="utf-8"))
    document["symbols"][4], document["symbols"][5] = document["symbols"][5], document["symbols"][4]
    (other / "tgt.tokenizer").write_text(json.dumps(document), encoding="utf-8")
    assert_one_line_error(run_cli("translate", "--model", best, other, stdin="abc\n"),
                          "its tokenizers differ from those of")


def test_plots_of_training_and_attention(trained):
    curve, attention = trained / "curve.png", trained / "attention.png"
    result = run_cli("plot", "--run", trained / "run", "--out", curve)
    assert result.returncode == 0 and curve.read_bytes()[:4] == b"\x89PNG", result.stderr
    result = run_cli("plot", "--model", trained / "run" / "best", "--text", "abc", "--out", attention)
    assert result.returncode == 0 and attention.read_bytes()[:4] == b"\x89PNG", result.stderr
    assert_one_line_error(run_cli("plot", "--out", curve), "give --run")


@pytest.mark.parametrize("flags, ratio", [(["--half"], 0.6), (["--weights", "int8"], 0.35)])
def test_smaller_exports_translate_alike(trained, flags, ratio):
    """float16 gives the same greedy output; int8 (this barely trained model's margins are too
    small to ask the same; tests/test_checkpoint.py bounds its weights and logits) translates."""
    model, small = trained / "run" / "best", trained / f"export{'-'.join(flags)}"
    result = run_cli("export", "--model", model, "--out", small, *flags)
    assert result.returncode == 0, result.stderr
    assert f"({'float16' if '--half' in flags else 'int8'} weights, " in result.stdout, result.stdout
    full_size = (model / "model.safetensors").stat().st_size
    assert (small / "model.safetensors").stat().st_size < ratio * full_size
    words = "abc\nbcd\nfed\n"
    same = run_cli("translate", "--model", model, "--beam", "1", stdin=words).stdout
    result = run_cli("translate", "--model", small, "--beam", "1", stdin=words)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 3, result.stderr
    if "--half" in flags:
        assert result.stdout == same


@pytest.mark.parametrize("flag", ["--int8", "--bf16"])
def test_low_precision_translation(trained, flag):
    result = run_cli("translate", "--model", trained / "run" / "best", flag, "--beam", "2", stdin="abc\nbcd\n")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 2, result.stderr
