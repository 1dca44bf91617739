"""``python -m jaxquant.bench``: run the benchmark sections, write a results file, print a table.

Options: ``--sections quant[,linear,weight_only,fp8,serving,sharding]`` (a section with parts takes
``name:part``, e.g. ``fp8:gemm``), ``--quick`` (small shapes, for a CPU smoke run), ``--sweep`` (tile
sweeps for the tuned tables), ``--out DIR`` (default ``benchmarks/results``). Each finished
measurement is printed as it comes and the results file is rewritten after every section, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# The sharding section partitions over every device; on a machine without GPUs XLA makes 8 CPU
# devices when asked before jax starts (the other sections run on device 0 as before).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

try:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ModuleNotFoundError as e:  # the benchmark's one extra dependency
    raise ModuleNotFoundError(f"python -m jaxquant.bench needs rich: pip install 'jaxquant[bench]' ({e})") from e

from jaxquant.bench import fp8, harness, linear, quant, sharding, weight_only

# section -> (module, whether it needs flax). A section module has run(ctx, **kw) -> rows and may
# have table(rows, title) for rows the generic table does not fit.
SECTIONS = {"quant": quant, "linear": linear, "weight_only": weight_only, "fp8": fp8,
            "serving": "jaxquant.bench.serving", "sharding": sharding}


def _section(name):
    mod = SECTIONS[name]
    if isinstance(mod, str):  # needs flax (jaxquant[flax]): imported when asked for
        try:
            mod = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            raise SystemExit(f"section {name!r} needs flax: pip install 'jaxquant[flax]' ({e})") from e
    return mod


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxquant.bench", description=__doc__)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run; numbers mean nothing)")
    p.add_argument("--sweep", action="store_true", help="also sweep kernel tiles")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = [s for s in wanted if s.partition(":")[0] not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; available: {list(SECTIONS)}")
    if not wanted:
        p.error(f"--sections: expected at least one of {list(SECTIONS)}")

    console = Console(stderr=True)
    ctx = harness.make_context(args.quick)
    if ctx.platform == "cpu" and not args.quick:
        console.print("[yellow]No GPU: kernels run in Pallas interpret mode; use --quick (numbers are not meaningful).")
    rows: list[dict] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as prog:
        task = prog.add_task("device copy bandwidth")
        ctx.progress = lambda msg: prog.update(task, description=msg)
        ctx.log = lambda msg: console.print(msg, highlight=False)
        ctx.copy_gbps = harness.copy_bandwidth(ctx)
        tables = {}
        path = harness.results_path(args.out, ctx)
        for wanted_name in wanted:
            name, _, part = wanted_name.partition(":")
            mod = _section(name)
            kwargs = {"sweep": args.sweep} if name == "quant" else {}
            if part:
                kwargs["parts"] = part.split("+")
            rows += mod.run(ctx, **kwargs)
            if hasattr(mod, "table"):
                tables[name] = mod.table
            harness.write_results(args.out, ctx, rows, path=path)  # after every section: a cut-short run keeps it

    out = Console(width=200)
    title = f"jaxquant on {ctx.device} (jax {harness.jax.__version__}); copy {ctx.copy_gbps:.0f} GB/s"
    table = Table(title=title, caption="* per layer of a chain of layers inside one jitted call (GPU time), where "
                  "measured; else per call. Decode calls timed one by one are bound by the host's dispatch.")
    for col in ("section", "op", "granularity / shape", "ms/call", "ms/layer*", "GB/s | TOP/s", "copy %", "vs jnp*",
                "vs bf16*", "target met"):
        table.add_column(col)
    for r in (r for r in rows if r["section"] not in tables):
        if "error" in r:
            table.add_row(r["section"], r["op"], str(r.get("config")), "error", "", "", "", "", "", "")
            continue
        rate = r.get("gbps") if r.get("gbps") is not None else r.get("tops")
        table.add_row(r["section"], r["op"], f"{r.get('granularity', '')} {r.get('shape', '')} {r.get('config', '')}".strip(),
                      _fmt(r.get("ms"), ".3f"), _fmt(r.get("chain_ms"), ".3f"), _fmt(rate, ".0f"),
                      _fmt(100 * r["copy_frac"], ".0f") if r.get("copy_frac") is not None else "",
                      _fmt(r.get("vs_jnp_chain", r.get("vs_jnp")), ".2f"),
                      _fmt(r.get("vs_bf16_chain", r.get("vs_bf16")), ".2f"),
                      "" if r.get("met") is None else ("yes" if r["met"] else "NO"))
    if table.row_count:
        out.print(table)
    for name, make_table in tables.items():
        own = [r for r in rows if r["section"] == name]
        if own:
            out.print(make_table(own, f"{name}: {title}"))
    out.print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
