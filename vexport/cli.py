"""The `vexport` command: a thin layer over the Python API. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from vexport.batching import CHECK_BATCH_TOKENS, DEFAULT_BATCH_TOKENS
from vexport.errors import VexportError


# The help layout: no "<bool>" beside flags, "MODEL" (not "{model}") for arguments in the usage line.
def _plain_help(params) -> None:
    """Flags show no type label; arguments show their name in capitals (as the docstrings spell them)."""
    for param in params:
        if isinstance(param, typer.core.TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
        elif isinstance(param, typer.core.TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()


class _PlainHelp:
    """Mixed into Typer's command and group classes: plain metavars in --help (see _plain_help)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _plain_help(self.params)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        _plain_help([option] if option is not None else [])
        return option


class _Command(_PlainHelp, typer.core.TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:  # Typer puts required arguments in braces: {MODEL}
        return [re.sub(r"^\{(.*)\}(\.\.\.)?$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


class _Group(_PlainHelp, typer.core.TyperGroup):
    pass


class _App(typer.Typer):
    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_Group,
           help="Export RLHF value models to fast formats and prove their values did not change.")
out = Console()
err = Console(stderr=True)


class Format(str, Enum):
    onnx = "onnx"
    gptq = "gptq"
    tensorrt = "tensorrt"


def _command(fn):
    """Run FN; a VexportError becomes 'error: ...' on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VexportError as exc:
            from rich.markup import escape  # so "pip install 'vexport[tensorrt]'" is not read as markup

            err.print(f"[bold red]error:[/] {escape(' '.join(str(exc).split()))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was left behind")
            raise typer.Exit(130) from None

    return wrapper


def _check_device(device: str | None) -> None:
    """--device of every command: a device this machine has, or one line naming the flag (exit 2)."""
    from vexport.runtime import check_device

    check_device(device, "--device")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does.")] = False):
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])
    if not verbose:  # vexport draws its own progress bars; transformers' per-load bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_FORMAT_NAMES = {"onnx": "ONNX", "gptq": "GPTQ", "tensorrt": "TensorRT"}


def _export_flags(fn):
    """Give FN (which takes **settings) one option per field of the export options classes
    (``vexport.export.options``): flag, type, default and help come from the field; a field two formats share
    (allow_pickle) is one flag, its help naming both."""
    from dataclasses import Field, fields

    from vexport.export.options import FORMATS, flag_of

    owners: dict[str, tuple[Field, list[str]]] = {}  # field name -> (the field, the formats that have it)
    for name, cls in FORMATS.items():
        for f in fields(cls):
            owners.setdefault(f.name, (f, []))[1].append(name)
    params = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    for name, (f, formats) in owners.items():
        meta, default = f.metadata, f.default
        kind = {os.PathLike: Path}.get(meta["cli_type"], meta["cli_type"]) or type(default)
        if meta["choices"]:
            kind = Literal[meta["choices"]]
        shown = True
        if isinstance(default, tuple):  # a (batch, sequence) shape: "B,T" on the command line, None: not given
            kind, default, shown = str, None, ",".join(map(str, default))
        option = typer.Option(flag_of(f), help=f"{', '.join(_FORMAT_NAMES[n] for n in formats)}: {meta['help']}",
                              show_default=shown)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[Optional[kind] if default is None else kind, option]))
    fn.__signature__ = inspect.Signature(params)
    return fn


@app.command()
@_command
@_export_flags
def export(
    model: Annotated[str, typer.Argument(help="Value model: a local folder or a hub id (or a GPTQ folder for onnx).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to write.")],
    format: Annotated[Format, typer.Option("--format", "-f")] = Format.onnx,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it is a vexport artifact or empty.")] = False,
    **settings,
):
    """Export MODEL to an artifact folder (weights + config + tokenizer + manifest.json).

    --format tensorrt takes a value model, a GPTQ folder or a TensorRT-bound ONNX folder. Flags name their formats.
    """
    from vexport.model import check_model_name

    check_model_name(model)  # a mistyped path fails before torch and transformers are imported
    _check_device(settings["device"])
    from vexport.export import export as export_model
    from vexport.export.options import options_for

    options = options_for(format.value, settings)
    out.print(f"wrote {export_model(model, output, format.value, options, force=force, progress=True)}")


@app.command()
@_command
def check(
    artifacts: Annotated[list[str], typer.Argument(
        metavar="DIR", help="Artifact folders (or any model vexport.load takes); several are compared in one run.")],
    reference: Annotated[str, typer.Option("--reference", "-r", help="The original value model.")],
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL prompt groups.")] = None,
    report: Annotated[Optional[list[Path]], typer.Option(
        "--report", help="Write a report: .json, .md or .html (repeat for several).")] = None,
    threshold: Annotated[Optional[list[str]], typer.Option("--threshold", help="Override, e.g. min_sqnr_db=50")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present)")] = None,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Tokens per batch.")] = CHECK_BATCH_TOKENS,
    seed: Annotated[int, typer.Option("--seed", help="Seeds torch and the plotted token sample.")] = 0,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin) reference weights.")] = False,
    verify_hashes: Annotated[bool, typer.Option("--verify-hashes/--no-verify-hashes",
                                                help="Check each artifact file's sha256 (sizes are always checked).")] = True,
    record: Annotated[bool, typer.Option("--record/--no-record", help=(
        "Record the verdict as `parity` in each artifact's manifest.json (--no-record writes nothing there)."))] = True,
):
    """Compare each artifact DIR with the reference on real tokens; the reference runs once.

    Exit 0: all pass, 1: any fails, 2: bad input.
    """
    _check_device(device)
    from vexport.checker import check as check_one
    from vexport.checker import check_many

    options = dict(prompts=prompts, thresholds=_overrides(threshold), device=device, batch_tokens=batch_tokens,
                   report=report, record=record, allow_pickle=allow_pickle, seed=seed, progress=True,
                   verify_hashes=verify_hashes)
    if len(artifacts) == 1:
        outcome = check_one(artifacts[0], reference, **options)
        _print_check(outcome)
    else:
        outcome = check_many(artifacts, reference, **options)
        _print_comparison(outcome.report)
    _print_written(outcome)
    raise typer.Exit(0 if outcome.passed else 1)


def _print_written(outcome) -> None:
    """Where the reports went and whether each manifest.json now holds the parity summary."""
    for path in outcome.reports:
        out.print(f"wrote report {path}", markup=False, highlight=False, soft_wrap=True)
    for note in outcome.records:
        line = (f"recorded parity in {note.manifest} (--no-record skips this)" if note.error is None
                else f"parity not recorded: {note.error}")
        out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
@_command
def info(artifact: Annotated[Path, typer.Argument(help="Artifact folder.")]):
    """Show what an artifact's manifest.json says."""
    from vexport.manifest import check_format_files, read_manifest

    manifest = read_manifest(artifact)
    check_format_files(artifact, manifest)  # a manifest naming another format than the files is said so
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
    if isinstance(parity.get("loosened"), list) and parity["loosened"]:
        verdict += f" (loosened: {', '.join(map(str, parity['loosened']))})"
    hidden = ("passed", "reference", "checked", "evalset", "thresholds", "loosened")
    figures = ", ".join(f"{k} {v}" for k, v in parity.items() if k not in hidden)
    return f"{verdict}: {figures}"


def _overrides(items: list[str] | None) -> dict[str, float | None] | None:
    """--threshold KEY=NUMBER, or KEY=none: that metric is not checked (where the key allows it)."""
    if not items:
        return None
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = None if value.strip().lower() == "none" else float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise VexportError(f"--threshold {item!r} is not KEY=NUMBER or KEY=none (e.g. min_sqnr_db=50)")
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


_COMPARISON_COLUMNS = ("Artifact", "Dtype / bits", "Size on disk", "Throughput", "Per-token SQNR", "Pearson",
                       "Pairwise agreement", "Result")


def _print_comparison(doc: dict) -> None:
    from rich.text import Text

    from vexport.report.summary import HEADER, summary_rows

    ref = doc["reference"]
    title = f"{len(doc['artifacts'])} artifacts vs reference ({ref['description']})"
    keep = [HEADER.index(name) for name in _COMPARISON_COLUMNS]
    rows = [[row[i] for i in keep] for row in summary_rows(doc)]
    widths = [max(len(HEADER[i]), *(len(row[n].text) for row in rows)) for n, i in enumerate(keep)]
    if sum(widths) + 3 * len(widths) + 1 > out.width:  # too narrow for the table: one block per row
        _print_vertical(title, [HEADER[i] for i in keep], rows)
    else:
        table = Table(title=title)
        for index in keep:
            table.add_column(HEADER[index])
        for row in rows:
            table.add_row(*(Text(cell.text, style="red" if cell.status == "fail" else "") for cell in row))
        out.print(table)
    out.print(f"{doc['evalset']['sequences']} sequences, {doc['evalset']['tokens']} tokens "
              f"({doc['evalset']['name']} evaluation set), seed {doc['seed']}")
    for entry in doc["artifacts"]:
        for failure in entry["parity"]["failures"]:
            out.print(f"[red]fail:[/] {entry['label']}: {failure}", highlight=False)
    out.print("[bold green]PASS[/]" if doc["passed"] else "[bold red]FAIL[/]")


def _print_vertical(title: str, header: list[str], rows: list) -> None:
    """The comparison as one block per row (the first cell its heading), for terminals narrower than the table."""
    from rich.text import Text

    out.print(title, style="italic", markup=False, highlight=False)
    width = max(len(name) for name in header[1:])
    for row in rows:
        out.print(Text(row[0].text, style="bold"))
        for name, cell in zip(header[1:], row[1:]):
            out.print(Text(f"  {name:<{width}}  ") + Text(cell.text, style="red" if cell.status == "fail" else ""))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


@app.command()
@_command
def score(
    model: Annotated[str, typer.Argument(help="Artifact folder, or a Hugging Face value model (folder or hub id).")],
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL or Parquet file, or a folder of them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the Parquet parts.")],
    per_token: Annotated[bool, typer.Option("--per-token", help="Also write every token's value.")] = False,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Longer rows are rejected.")] = None,
    batch_tokens: Annotated[int, typer.Option(
        "--batch-tokens", help="Padded tokens per batch.")] = DEFAULT_BATCH_TOKENS,
    engine: Annotated[str, typer.Option("--engine", help="local or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Join this Ray cluster.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray actors (default: GPUs, else CPUs).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Score only the rows OUTPUT lacks.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad row (exit 2).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT when it is a previous score output.")] = False,
    append_eos: Annotated[bool, typer.Option("--append-eos", help="End chat rows with the eos token.")] = False,
    part_rows: Annotated[int, typer.Option("--part-rows", help="Input rows per output part.")] = 1024,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per worker.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present).")] = None,
):
    """Score every row of INPUT with MODEL into Parquet parts in OUTPUT (resumable; exit 2 on bad input)."""
    _check_device(device)
    from vexport.scoring import score as run_score

    try:
        summary = run_score(model, input, output, per_token=per_token, max_length=max_length, batch_tokens=batch_tokens,
                            engine=engine, ray_address=ray_address, workers=workers, resume=resume, strict=strict,
                            force=force, append_eos=append_eos, part_rows=part_rows, threads=threads, device=device,
                            progress=True)
    except KeyboardInterrupt:
        err.print(f"interrupted: the parts written so far are kept; rerun with --resume to finish {output}")
        raise typer.Exit(130) from None
    if resume and summary["this_run"]["rows"] == 0:
        out.print(f"nothing left to score: {output} is complete ({summary['rows_scored']} rows scored, "
                  f"{summary['rows_rejected']} rejected, see {output / 'errors.jsonl'})",
                  highlight=False, soft_wrap=True)
        return
    out.print(f"scored {summary['rows_scored']} rows, rejected {summary['rows_rejected']} "
              f"(see {output / 'errors.jsonl'}); {summary['this_run']['tokens_per_s']:,.0f} tokens/s; wrote {output}")


@app.command()
@_command
def serve(
    model: Annotated[str, typer.Argument(help="Artifact folder, or a Hugging Face value model (folder or hub id).")],
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' "
                                                   "(default: env VEXPORT_API_KEY).")] = None,
    batch_tokens: Annotated[int, typer.Option(
        "--batch-tokens", help="Padded tokens per model batch.")] = DEFAULT_BATCH_TOKENS,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest a request waits for a batch.")] = 5.0,
    max_queue_tokens: Annotated[Optional[int], typer.Option("--max-queue-tokens", help="Queued tokens before 429 "
                                                            "(default: 32 batches).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Longer sequences are refused.")] = None,
    engine: Annotated[str, typer.Option("--engine", help="local or ray (Ray Serve replicas).")] = "local",
    replicas: Annotated[Optional[int], typer.Option("--replicas", help="Ray: replicas (default: GPUs or 1).")] = None,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray: join this cluster.")] = None,
    session_memory_mb: Annotated[float, typer.Option("--session-memory-mb", help="Sessions' KV cache cap.")] = 1024.0,
    session_ttl_s: Annotated[float, typer.Option("--session-ttl-s", help="Idle seconds to expiry.")] = 600.0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda if present).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per model.")] = None,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="Largest request body in MiB, counted as it "
                                               "arrives (chunked too); over it: 413.")] = 64.0,
):
    """Serve MODEL's values over HTTP: OpenRLHF /get_reward, vLLM /pooling and /classify, /v1/... (see README)."""
    from vexport.serve import require_serve

    require_serve(engine)
    from vexport.serve.config import ServeOptions
    from vexport.serve.server import Server

    options = ServeOptions(host=host, port=port, api_key=api_key, batch_tokens=batch_tokens, max_wait_ms=max_wait_ms,
                           max_queue_tokens=max_queue_tokens, max_length=max_length, engine=engine, replicas=replicas,
                           ray_address=ray_address, session_memory_mb=session_memory_mb, session_ttl_s=session_ttl_s,
                           device=device, threads=threads, max_body_mb=max_body_mb)
    server = Server.prepare(model, options)
    out.print(f"serving {model} on {server.url} ({engine} engine); SIGTERM or Ctrl-C drains and stops",
              highlight=False, soft_wrap=True)
    server.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
