"""The `vexport` command: a thin layer over the Python API. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from vexport.errors import VexportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export RLHF value models to fast formats and prove their values did not change.")
out = Console()
err = Console(stderr=True)


class Format(str, Enum):
    onnx = "onnx"
    gptq = "gptq"


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


def _command(fn):
    """Run FN; a VexportError becomes 'error: ...' on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VexportError as exc:
            err.print(f"[bold red]error:[/] {' '.join(str(exc).split())}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was left behind")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False):
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    if not verbose:  # vexport draws its own progress bars; transformers' per-load bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.command()
@_command
def export(
    model: Annotated[str, typer.Argument(help="Value model: a local folder or a hub id (or a GPTQ folder for onnx).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to write.")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.onnx,
    dtype: Annotated[Dtype, typer.Option("--dtype", help="ONNX: weight/activation dtype.")] = Dtype.float32,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin) weights.")] = False,
    bits: Annotated[int, typer.Option("--bits", help="GPTQ: bits per weight (4).")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="GPTQ: group size, -1 per channel.")] = 128,
    desc_act: Annotated[bool, typer.Option("--desc-act/--no-desc-act", help="GPTQ: act-order.")] = False,
    sym: Annotated[bool, typer.Option("--sym/--no-sym", help="GPTQ: symmetric grid.")] = True,
    value_calibration: Annotated[bool, typer.Option("--value-calibration/--no-value-calibration",
                                                    help="GPTQ: refit the fp16 head on calibration text.")] = True,
    calibration: Annotated[Optional[Path], typer.Option("--calibration", help="GPTQ: calibration JSONL.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="GPTQ: calibration windows.")] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="GPTQ: tokens per window.")] = 512,
    device: Annotated[Optional[str], typer.Option("--device", help="GPTQ: cuda or cpu.")] = None,
):
    """Export MODEL to an artifact folder (weights + config + tokenizer + manifest.json)."""
    if format is Format.onnx:
        from vexport.export.onnx import export_onnx

        path = export_onnx(model, output, dtype.value, force=force, allow_pickle=allow_pickle, progress=True)
    else:
        from vexport.export.gptq import export_gptq
        from vexport.quant.stream import GPTQOptions

        options = GPTQOptions(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act)
        path = export_gptq(model, output, options, value_calibration=value_calibration, calibration=calibration,
                           samples=samples, seq_len=seq_len, device=device, force=force, allow_pickle=allow_pickle,
                           progress=True)
    out.print(f"wrote {path}")


@app.command()
@_command
def check(
    artifacts: Annotated[list[str], typer.Argument(
        help="Artifact folders (or any model vexport.load takes); several are compared in one run.")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="The original value model.")],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL prompt groups.")] = None,
    report: Annotated[Optional[list[Path]], typer.Option(
        "--report", help="Write a report: .json, .md or .html (repeat for several).")] = None,
    threshold: Annotated[Optional[list[str]], typer.Option("--threshold", help="Override, e.g. min_sqnr_db=50")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present)")] = None,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Tokens per batch.")] = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seeds torch and the plotted token sample.")] = 0,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle")] = False,
):
    """Compare each ARTIFACT with the reference on real tokens; the reference runs once.

    Exit 0: all pass, 1: any fails, 2: bad input.
    """
    from vexport.checker import check as check_one
    from vexport.checker import check_many

    options = dict(prompts=prompts, thresholds=_overrides(threshold), device=device, batch_tokens=batch_tokens,
                   report=report, allow_pickle=allow_pickle, seed=seed, progress=True)
    if len(artifacts) == 1:
        outcome = check_one(artifacts[0], reference, **options)
        _print_check(outcome)
        raise typer.Exit(0 if outcome.result.passed else 1)
    comparison = check_many(artifacts, reference, **options)
    _print_comparison(comparison.report)
    raise typer.Exit(0 if comparison.passed else 1)


@app.command()
@_command
def info(artifact: Annotated[Path, typer.Argument(help="Artifact folder.")]):
    """Show what an artifact's manifest.json says."""
    from vexport.manifest import read_manifest

    manifest = read_manifest(artifact)
    table = Table(title=f"{artifact}", show_header=False)
    for key, value in _info_rows(manifest):
        table.add_row(key, value)
    out.print(table)


def _info_rows(m) -> list[tuple[str, str]]:
    model = m.model
    rows = [("format", m.format), ("precision", m.precision), ("source", str(m.source.get("model"))),
            ("architecture", str(m.source.get("architecture"))),
            ("shape", f"{model.get('num_hidden_layers')} layers, hidden {model.get('hidden_size')}, "
                      f"{model.get('num_attention_heads')} heads / {model.get('num_key_value_heads')} kv"),
            ("inputs", ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in m.inputs)),
            ("outputs", ", ".join(f"{o['name']} {o['dtype']} {o['shape']}" for o in m.outputs)),
            ("size", f"{sum(f['size'] for f in m.files.values()) / 1e6:.1f} MB in {len(m.files)} files")]
    rows += [(k, str(v)) for k, v in m.format_options.items() if k != "operator_counts"]
    rows.append(("parity", _parity_line(m.parity)))
    rows += [("created", m.created), ("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items()))]
    return rows


def _parity_line(parity: dict | None) -> str:
    if not parity:
        return "not checked (run vexport check)"
    verdict = "PASS" if parity.get("passed") else "FAIL"
    figures = ", ".join(f"{k} {v}" for k, v in parity.items() if k not in ("passed", "reference", "checked", "evalset"))
    return f"{verdict}: {figures}"


def _overrides(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise VexportError(f"--threshold {item!r} is not KEY=NUMBER (e.g. min_sqnr_db=50)")
    return overrides


def _print_check(outcome) -> None:
    result, doc = outcome.result, outcome.report
    ref = doc["reference"]
    table = Table(title=f"{doc['artifact']['format']} {doc['artifact']['precision']} vs reference "
                        f"({ref['backend']} {ref['dtype']} on {ref['device']})")
    for column in ("metric", "value", "threshold", "status"):
        table.add_column(column)
    for c in doc["parity"].get("checks", []):
        table.add_row(str(c.get("metric")), _fmt(c.get("value")), f"{c.get('op', '')} {_fmt(c.get('threshold'))}",
                      str(c.get("status", "")).upper())
    out.print(table)
    out.print(f"{doc['evalset']['sequences']} sequences, {doc['evalset']['tokens']} tokens "
              f"({doc['evalset']['name']} evaluation set)")
    for failure in result.failures:
        out.print(f"[red]fail:[/] {failure}")
    out.print("[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]")


_COMPARISON_COLUMNS = ("Artifact", "Dtype / bits", "Size on disk", "Load", "Throughput", "Per-token SQNR",
                       "Max abs error", "Pearson", "Top-1 agreement", "Pairwise agreement", "Result")


def _print_comparison(doc: dict) -> None:
    from rich.text import Text

    from vexport.report.summary import HEADER, summary_rows

    ref = doc["reference"]
    table = Table(title=f"{len(doc['artifacts'])} artifacts vs reference ({ref['description']})")
    keep = [HEADER.index(name) for name in _COMPARISON_COLUMNS]
    for index in keep:
        table.add_column(HEADER[index])
    for row in summary_rows(doc):
        table.add_row(*(Text(row[i].text, style="red" if row[i].status == "fail" else "") for i in keep))
    out.print(table)
    out.print(f"{doc['evalset']['sequences']} sequences, {doc['evalset']['tokens']} tokens "
              f"({doc['evalset']['name']} evaluation set), seed {doc['seed']}")
    for entry in doc["artifacts"]:
        for failure in entry["parity"]["failures"]:
            out.print(f"[red]fail:[/] {entry['label']}: {failure}", highlight=False)
    out.print("[bold green]PASS[/]" if doc["passed"] else "[bold red]FAIL[/]")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
