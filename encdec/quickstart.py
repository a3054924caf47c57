"""The embedded main job: learn to write numbers in English words, from scratch, in about 3 minutes.

It needs no data of the user's: ``num2words`` makes the task (``"4021"`` ->
``"four thousand and twenty-one"``), with disjoint train, dev and test numbers.
"""
from __future__ import annotations

import random
from pathlib import Path

from num2words import num2words

from .config import RunConfig, from_dict
from .metrics import exact_match
from .train import Trainer
from .translator import load

TRAIN_SIZE, DEV_SIZE, TEST_SIZE = 40000, 300, 1000


def make_task(folder: Path, seed: int = 0) -> None:
    """Write ``{train,dev,test}.{src,tgt}``: numbers below a million (mostly) and their English words."""
    rng = random.Random(seed)
    numbers: set[int] = set()
    while len(numbers) < TRAIN_SIZE + DEV_SIZE + TEST_SIZE:
        digits = rng.randint(1, 6)  # as many short numbers as long ones
        numbers.add(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))
    ordered = sorted(numbers)
    rng.shuffle(ordered)
    splits = {"test": ordered[:TEST_SIZE], "dev": ordered[TEST_SIZE:TEST_SIZE + DEV_SIZE],
              "train": ordered[TEST_SIZE + DEV_SIZE:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in splits.items():
        (folder / f"{name}.src").write_text("".join(f"{n}\n" for n in values), encoding="utf-8")
        (folder / f"{name}.tgt").write_text("".join(f"{num2words(n)}\n" for n in values), encoding="utf-8")


def quickstart_config(data: Path, minutes: float) -> RunConfig:
    return from_dict(RunConfig, {
        "data": {"train": [str(data / "train.src"), str(data / "train.tgt")],
                 "dev": [str(data / "dev.src"), str(data / "dev.tgt")],
                 "src_tokenizer": {"kind": "char"}, "tgt_tokenizer": {"kind": "symbol"}, "max_len": 64},
        "model": {"d_model": 128, "heads": 4, "ff": 512, "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0,
                  "max_len": 64},
        "train": {"max_tokens": 1500, "lr": 0.003, "warmup": 150, "max_steps": 5000, "max_minutes": minutes,
                  "validate_every": 400, "metric": "exact", "label_smoothing": 0.1, "seed": 1, "log_every": 25},
    })


def run(run_dir: str | Path = "runs/quickstart", minutes: float = 2.5, examples: int = 8) -> float:
    """Make the task, train, score exact match on the held-out test numbers, show examples. Returns the score."""
    run_dir = Path(run_dir)
    data = run_dir / "task"
    if not (data / "test.tgt").exists():
        make_task(data)
    print(f"task: numbers in digits -> English words ({TRAIN_SIZE} train, {DEV_SIZE} dev, {TEST_SIZE} test), "
          f"run folder {run_dir}")
    Trainer(quickstart_config(data, minutes), run_dir).train()
    translator = load(run_dir / "best")
    sources = (data / "test.src").read_text(encoding="utf-8").splitlines()
    references = (data / "test.tgt").read_text(encoding="utf-8").splitlines()
    outputs = translator.translate(sources, beam=1)
    score = exact_match(outputs, references)
    print(f"\nheld-out test: exact match {score:.2f}% on {len(sources)} numbers never seen in training")
    for source, output in zip(sources[:examples], outputs[:examples]):
        print(f"  {source:>8} -> {output}")
    print(f"\ntry it: encdec translate --model {run_dir / 'best'}  (type numbers, one per line)")
    return score
