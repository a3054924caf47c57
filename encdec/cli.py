"""The ``encdec`` command: train, translate, evaluate, serve, average, export, g2p, plot, quickstart.

User errors (bad config, missing files, corrupt checkpoints, unusable input)
print one line, ``encdec: error: ...``, and exit with status 2: no traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import WEIGHT_FORMATS, CheckpointError
from .distributed import DistributedError

G2P_MODEL = Path(__file__).resolve().parents[1] / "models" / "g2p-en"
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, CheckpointError)


def _number(kind: type, low: float, inclusive: bool = True):
    """An argparse type: ``kind`` (int or float) at least ``low`` (above it if not ``inclusive``)."""
    bound = f">= {low}" if inclusive else f"> {low}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


COUNT = _number(int, 1)  # beam sizes, batch sizes, how many
POSITIVE = _number(float, 0, inclusive=False)  # ratios, minutes


def _add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, nargs="+", required=True, metavar="FOLDER",
                   help="model folder, e.g. runs/NAME/best; several folders (trained with the same tokenizers) "
                        "decode as an ensemble that averages their probabilities")


def _add_decoding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=COUNT, default=5, help="beam size; 1 is greedy search (default 5)")
    p.add_argument("--alpha", type=float, default=1.0, help="GNMT length penalty exponent (default 1.0; 0 = off)")
    p.add_argument("--max-len-ratio", type=POSITIVE, default=2.0,
                   help="longest output as a multiple of the source length, plus 10 (default 2.0)")
    p.add_argument("--batch-tokens", type=COUNT, default=8000, help="source tokens x beam per decoding batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", dest="precision", action="store_const", const="int8", default="fp32",
                           help="int8 dynamic quantization of the Linear layers: faster on CPU, outputs may differ slightly")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 Linear layers: much faster on CPUs with AMX or AVX512-BF16, outputs may differ "
                                "slightly")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encdec", description="Train and run encoder-decoder Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config (resumes if the run folder has checkpoints)")
    p.add_argument("config", type=Path, help="YAML file with data:, model: and train: sections")
    p.add_argument("--run", type=Path, help="run folder (default runs/<config name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.001 (repeatable)")

    p = sub.add_parser("translate", help="translate lines from stdin (or --input) to stdout (or --output)")
    _add_model_option(p)
    p.add_argument("--input", type=Path, help="input file, one segment per line (default stdin)")
    p.add_argument("--output", type=Path, help="output file (default stdout)")
    p.add_argument("--n-best", type=COUNT, default=1, help="print the N best outputs per line, tab-separated with scores")
    _add_decoding_options(p)

    p = sub.add_parser("evaluate", help="translate a test set and score it")
    _add_model_option(p)
    p.add_argument("--src", type=Path, required=True, help="source file, one segment per line")
    p.add_argument("--ref", type=Path, required=True,
                   help="references, one line per source line; several correct answers separated by tabs")
    p.add_argument("--metric", choices=["text", "symbols"], default="text",
                   help="text: BLEU and chrF (sacreBLEU); symbols: WER and PER, e.g. for G2P (default text)")
    p.add_argument("--tokenize", default="13a", help="sacreBLEU tokenizer for BLEU (default 13a; 'none' = raw)")
    p.add_argument("--output", type=Path, help="also write the outputs here")
    _add_decoding_options(p)

    p = sub.add_parser("serve", help="serve a model over HTTP: POST /translate, GET /health (API page at /docs)")
    _add_model_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=_number(int, 0), default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--max-texts", type=COUNT, default=1000, help="most texts one request may hold (default 1000)")
    p.add_argument("--max-batch-sentences", type=COUNT, default=64,
                   help="requests arriving together are decoded as one batch of up to this many texts (default 64)")
    p.add_argument("--max-wait-ms", type=_number(float, 0), default=5.0,
                   help="how long a batch waits for more requests before decoding (default 5 ms)")
    _add_decoding_options(p)

    p = sub.add_parser("average", help="average the weights of checkpoints into a new model folder")
    p.add_argument("checkpoints", nargs="*", type=Path, help="checkpoint folders to average")
    p.add_argument("--run", type=Path, help="instead: a run folder, averaging its last --last checkpoints")
    p.add_argument("--last", type=COUNT, default=5, help="how many of the run's last checkpoints (default 5)")
    p.add_argument("--out", type=Path, required=True, help="folder for the averaged model")

    p = sub.add_parser("export", help="copy a model folder, optionally with smaller (float16 or int8) weights")
    p.add_argument("--model", type=Path, required=True, help="model folder to export")
    p.add_argument("--out", type=Path, required=True, help="new model folder")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="float32",
                   help="how to store the weights: float32 (default), float16 (half the size) or int8 "
                        "(a quarter: matrices as int8 with per-row scales); loading always gives float32")
    p.add_argument("--half", action="store_const", const="float16", dest="weights", help="same as --weights float16")

    p = sub.add_parser("g2p", help="English words -> ARPAbet phonemes with the shipped CMUdict model")
    p.add_argument("words", nargs="*", help="words or phrases to pronounce (default: one per line from stdin); "
                                            "numbers are read out, accents folded, hyphenated words split")
    p.add_argument("--model", type=Path, default=G2P_MODEL, help=f"model folder (default {G2P_MODEL})")
    p.add_argument("--beam", type=COUNT, default=5, help="beam size (default 5)")
    p.add_argument("--alpha", type=float, default=0.0, help="GNMT length penalty exponent (default 0 = off)")

    p = sub.add_parser("plot", help="draw a run's training curve (--run) or one sentence's attention (--model --text)")
    p.add_argument("--run", type=Path, help="run folder: plot loss and the dev metric from its log.jsonl")
    p.add_argument("--model", type=Path, help="model folder: plot encoder-decoder attention for --text")
    p.add_argument("--text", help="the sentence to translate and show attention for")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")

    p = sub.add_parser("quickstart", help="learn numbers -> English words from scratch (~3 minutes), then evaluate")
    p.add_argument("--run", type=Path, default=Path("runs/quickstart"), help="run folder (default runs/quickstart)")
    p.add_argument("--minutes", type=POSITIVE, default=2.5, help="training time budget (default 2.5)")
    return parser


def _read_lines(path: Path | None) -> list[str]:
    if path is None:
        return [line.rstrip("\n") for line in sys.stdin]
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _decode_kwargs(args) -> dict:
    return dict(beam=args.beam, alpha=args.alpha, max_len_ratio=args.max_len_ratio, batch_tokens=args.batch_tokens)


def cmd_train(args) -> None:
    from .config import load_config
    from .train import train

    cfg = load_config(args.config, args.set)
    train(cfg, args.run or Path("runs") / args.config.stem)


def cmd_translate(args) -> None:
    from .translator import load

    translator = load(args.model, args.device, args.precision)
    if args.input is None and sys.stdin.isatty() and args.output is None:
        # Interactive: answer each line as it is typed (Ctrl-D ends).
        for line in sys.stdin:
            for text, score in translator.translate_nbest([line.rstrip("\n")], n_best=args.n_best,
                                                          **_decode_kwargs(args))[0]:
                print(text if args.n_best == 1 else f"{text}\t{score:.4f}", flush=True)
        return
    lines = _read_lines(args.input)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.n_best > 1:
            for hyps in translator.translate_nbest(lines, n_best=args.n_best, **_decode_kwargs(args)):
                out.write("\t".join(f"{text}\t{score:.4f}" for text, score in hyps) + "\n")
        else:
            out.writelines(f"{text}\n" for text in translator.translate(lines, **_decode_kwargs(args)))
    finally:
        if args.output:
            out.close()


def cmd_evaluate(args) -> None:
    from .metrics import bleu, chrf, evaluate_all
    from .translator import load

    sources, refs = _read_lines(args.src), [line.split("\t") for line in _read_lines(args.ref)]
    if len(sources) != len(refs):
        raise ValueError(f"{args.src} has {len(sources)} lines but {args.ref} has {len(refs)}; they must align")
    outputs = load(args.model, args.device, args.precision).translate(sources, **_decode_kwargs(args))
    if args.output:
        args.output.write_text("".join(f"{o}\n" for o in outputs), encoding="utf-8")
    if args.metric == "symbols":
        scores = evaluate_all(outputs, refs, kind="symbols")
        print(f"WER {scores['wer']:.2f}  PER {scores['per']:.2f}  ({len(sources)} items)")
    else:
        print(f"BLEU {bleu(outputs, refs, tokenize=args.tokenize):.2f}  chrF {chrf(outputs, refs):.2f}  "
              f"({len(sources)} segments, tokenize={args.tokenize})")


def cmd_serve(args) -> None:
    import socket

    import uvicorn

    from .server import create_app
    from .translator import load

    for name in ("max_texts", "max_batch_sentences", "beam"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    translator = load(args.model, args.device, args.precision)
    label = " + ".join(map(str, args.model))
    app = create_app(translator, name=label, precision=args.precision, beam=args.beam, alpha=args.alpha,
                     max_len_ratio=args.max_len_ratio, max_texts=args.max_texts,
                     max_batch_sentences=args.max_batch_sentences, max_wait_ms=args.max_wait_ms,
                     batch_tokens=args.batch_tokens)
    # Bind here, not in uvicorn, so that a taken port is a one-line error and port 0 can be reported.
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # from here connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    host, port = sock.getsockname()[:2]
    print(f"serving {label} on http://{host}:{port} (POST /translate, GET /health, API page /docs)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def cmd_average(args) -> None:
    from .checkpoint import average_checkpoints

    folders = list(args.checkpoints)
    if args.run:
        folders += sorted((args.run / "checkpoints").glob("step-*[0-9]"))[-args.last:]
    if not folders:
        raise ValueError("no checkpoints given; pass checkpoint folders or --run RUN_FOLDER")
    average_checkpoints(folders, args.out)
    print(f"averaged {len(folders)} checkpoints into {args.out}")


def cmd_export(args) -> None:
    from .checkpoint import atomic_folder, load_model_folder, save_model_folder

    model, src_tok, tgt_tok, config = load_model_folder(args.model)
    extra = {k: v for k, v in config.items() if k not in ("model", "src_tokenizer", "tgt_tokenizer")}
    with atomic_folder(args.out) as tmp:
        save_model_folder(tmp, model, src_tok, tgt_tok, extra, weights=args.weights)
    size = (args.out / "model.safetensors").stat().st_size / 2**20
    print(f"exported {args.model} to {args.out} ({args.weights} weights, {size:.1f} MiB)")


def cmd_g2p(args) -> None:
    from .g2p import pronounce
    from .translator import load

    if not (args.model / "config.json").exists() and args.model == G2P_MODEL:
        raise FileNotFoundError(f"no G2P model at {G2P_MODEL}; train one with 'bash recipes/g2p/run.sh' "
                                "and pass --model runs/g2p/best")
    texts = args.words or [line.strip() for line in sys.stdin if line.strip()]
    outputs, skipped = pronounce(load(args.model), texts, beam=args.beam, alpha=args.alpha)
    if skipped:
        print(f"warning: skipped letters the model cannot read: {' '.join(sorted(skipped))}", file=sys.stderr)
    for text, phonemes in zip(texts, outputs):
        print(f"{text}\t{phonemes}")


def cmd_plot(args) -> None:
    from .plots import plot_attention, plot_training

    if args.run:
        print(f"wrote {plot_training(args.run, args.out)}")
    elif args.model and args.text is not None:
        from .translator import load

        print(f"wrote {plot_attention(load(args.model), args.text, args.out)}")
    else:
        raise ValueError("give --run RUN_FOLDER for the training curve, or --model MODEL --text SENTENCE for attention")


def cmd_quickstart(args) -> None:
    from .quickstart import run

    run(args.run, args.minutes)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"train": cmd_train, "translate": cmd_translate, "evaluate": cmd_evaluate, "serve": cmd_serve,
               "average": cmd_average, "export": cmd_export, "g2p": cmd_g2p, "plot": cmd_plot,
               "quickstart": cmd_quickstart}[args.command]
    try:
        command(args)
    except USER_ERRORS as e:
        print(f"encdec: error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:  # another rank failed: say so in one line, this rank is not the cause
        print(f"encdec: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("encdec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
