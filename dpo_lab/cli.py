"""The `dpo-lab` command: list, run and benchmark the workbook, write its student versions, and train."""
import argparse
import ast
import sys
import time

from dpo_lab.paths import build_dir


def _parse_param(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"-p expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)  # numbers, booleans, lists; anything else stays a string
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def cmd_list(args) -> int:
    from dpo_lab.workbook import lesson_title, list_notebooks
    for name in list_notebooks():
        print(f"{name:28s} {lesson_title(name)}")
    return 0


def cmd_run(args) -> int:
    from tqdm.auto import tqdm

    from pathlib import Path

    from dpo_lab.workbook import NotebookFailed, list_notebooks, notebook_path, run_notebook
    if args.results and args.profile != "full":
        print("error: --results records full-profile runs only: add --profile full", file=sys.stderr)
        return 2
    source = Path(args.source) if args.source else None
    if source is None:
        names = args.names or list_notebooks()
        for n in names:
            notebook_path(n)  # fail before running anything if a name is wrong
    else:
        names = args.names or sorted(p.stem for p in source.glob("[0-9][0-9]_*.ipynb"))
        missing = [n for n in names if not (source / f"{n}.ipynb").exists()]
        if missing or not names:
            print(f"error: no notebook {', '.join(missing) or '[0-9][0-9]_*'}.ipynb in {source}", file=sys.stderr)
            return 2
    out = build_dir(args.out)
    params = dict(args.param or [])
    results, failed = {}, None
    bar = tqdm(names, desc="notebooks", unit="nb")
    for name in bar:
        bar.set_postfix_str(name)
        try:
            results[name] = run_notebook(name, args.profile, out, params, cell_timeout=args.cell_timeout,
                                         source_dir=source)
        except NotebookFailed as e:
            failed = e
            break
    bar.close()
    _print_summary(results)
    if args.results:
        from dpo_lab.quotes import write_results
        for name, res in results.items():
            print(f"results: {write_results(name, res['figures'], res['seconds'])}")
    if failed:
        print(f"\nFAILED: {failed}", file=sys.stderr)
        return 1
    print(f"\nexecuted notebooks in {out / 'notebooks'}, figures in {out / 'metrics'}")
    return 0


def _print_summary(results: dict) -> None:
    for name, res in results.items():
        print(f"\n== {name}  ({res['seconds']:.1f} s)")
        for key, value in res["figures"].items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            print(f"  {key:48s} {shown}")


def cmd_bench(args) -> int:
    from dpo_lab.bench import available, run_bench
    if args.name is None:
        print("benchmarks:", ", ".join(available()) or "none")
        return 0
    run_bench(args.name, quick=args.quick, output_dir=args.out)
    return 0


def cmd_student(args) -> int:
    from dpo_lab.exercises.student import MarkerError, write_student_versions
    from dpo_lab.workbook import list_notebooks, notebook_path
    names = args.names or list_notebooks()
    try:
        for n in names:
            notebook_path(n)
        paths = write_student_versions(names, args.out)
    except (FileNotFoundError, MarkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    print(f"run them: dpo-lab run --from {args.out}   (every check says 'not implemented yet')")
    return 0


def cmd_exercises(args) -> int:
    import json

    from dpo_lab.exercises.catalog import catalog
    from dpo_lab.figures import write_figures
    cat = catalog()
    path = write_figures("exercises", cat["figures"], args.out)
    if args.json:
        print(json.dumps(cat["figures"], indent=2, sort_keys=True))
        return 0
    for ex in cat["exercises"]:
        wrong = f"{ex['wrong_solution_tests']} wrong-solution test(s)" if ex["wrong_solution_tests"] else "no wrong-solution test"
        print(f"{ex['id']:6s} {ex['notebook']:28s} {ex['title']:44s} {wrong}")
    f = cat["figures"]
    print(f"\n{f['exercises_total']} exercises, {f['exercises_with_wrong_solution_tests']} with "
          f"wrong-solution tests; written to {path}")
    return 0


def cmd_memory(args) -> int:
    """The DPO memory planner's breakdown for a training config (dpo_lab.memory.planner)."""
    import json

    from dpo_lab.dpo.config import ConfigError, load_config
    from dpo_lab.memory.planner import model_shape, plan_dpo_memory
    try:
        cfg = load_config(args.config, args.overrides)
        plan = plan_dpo_memory(model_shape(cfg.model.name), cfg, nproc=args.nproc, device_gib=args.device_gib,
                               zero_stage=args.zero_stage, tp=args.tp, pp=args.pp, finetune=args.finetune,
                               reference=args.reference)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        i = plan.inputs
        print(f"{args.config}: {i['model']}, {i['nproc']} rank(s) (dp={i['dp']}, tp={i['tp']}, pp={i['pp']}, "
              f"ZeRO-{i['zero_stage']}), {i['finetune']}, reference {i['reference']}, "
              f"{i['tokens']} tokens per micro-batch; bytes per rank:")
        print(plan.table())
    return 0 if plan.fits in (None, True) else 1


def cmd_cache(args) -> int:
    """The reference log-prob cache: what it holds, and pruning it to a size (least recently used first)."""
    from datetime import datetime

    from dpo_lab.dpo import ref_cache
    from dpo_lab.paths import cache_dir
    root = args.dir or cache_dir()
    if args.max_gib is not None:
        if args.max_gib < 0:
            print(f"error: --max-gib {args.max_gib} must be >= 0", file=sys.stderr)
            return 2
        for e in ref_cache.prune(root, int(args.max_gib * 2**30)):
            print(f"deleted {e['dir']} ({e['bytes'] / 2**20:.1f} MiB)")
    entries = ref_cache.usage(root)
    for e in entries:
        when = datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        print(f"{e['dir'].name}  {e['bytes'] / 2**20:9.1f} MiB  {e['rows'] if e['rows'] is not None else '?':>8} rows  "
              f"last used {when}")
    print(f"{len(entries)} reference cache(s), {sum(e['bytes'] for e in entries) / 2**20:.1f} MiB in "
          f"{root}/ref_logps")
    return 0


def cmd_train(args, rest) -> int:
    if args.kind != "dpo":
        print(f"unknown training kind {args.kind!r}; have: dpo", file=sys.stderr)
        return 2
    from dpo_lab.dpo.trainer import cli_main
    return cli_main(rest)  # prints config and data errors itself, exit code 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dpo-lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the notebooks with their lesson titles")
    r = sub.add_parser("run", help="execute notebooks headlessly (all by default)")
    r.add_argument("names", nargs="*", metavar="NAME")
    r.add_argument("--profile", choices=("smoke", "full"), default="smoke")
    r.add_argument("--out", default=None, help="output root (default: build/)")
    r.add_argument("-p", "--param", action="append", type=_parse_param, metavar="KEY=VALUE",
                   help="override a notebook parameter (repeatable)")
    r.add_argument("--cell-timeout", type=int, default=900, help="seconds per cell")
    r.add_argument("--results", action="store_true",
                   help="with --profile full: also write results/<name>.json (figures + machine), "
                        "the source of the numbers lessons quote from full runs")
    r.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="run the notebooks in DIR instead (e.g. the student versions)")
    st = sub.add_parser("student", help="write the student versions (solutions replaced by stubs)")
    st.add_argument("names", nargs="*", metavar="NAME")
    st.add_argument("--out", default="build/student", help="where to write them (default: build/student)")
    ex = sub.add_parser("exercises", help="list the graded exercises; write build/metrics/exercises.json")
    ex.add_argument("--json", action="store_true", help="print the figures as JSON")
    ex.add_argument("--out", default=None, help="output root (default: build/)")
    b = sub.add_parser("bench", help="run a benchmark: variants side by side, with ratios")
    b.add_argument("name", nargs="?")
    b.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    b.add_argument("--out", default=None)
    mem = sub.add_parser("memory", help="peak memory per rank of a DPO training config, term by term")
    mem.add_argument("--config", required=True, help="YAML file (configs/dpo/*.yaml)")
    mem.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.micro_batch=4")
    mem.add_argument("--nproc", type=int, default=1, help="ranks (GPUs) = dp x tp x pp (default 1)")
    mem.add_argument("--device-gib", type=float, default=None,
                     help="memory per device in GiB: say whether it fits (exit code 1 if not)")
    mem.add_argument("--zero-stage", type=int, default=3, choices=(0, 1, 2, 3),
                     help="3 = FSDP, as our trainer (default)")
    mem.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    mem.add_argument("--pp", type=int, default=1, help="pipeline stages")
    mem.add_argument("--finetune", choices=("lora", "full"), default=None,
                     help="default: from the config (train.finetune)")
    mem.add_argument("--reference", choices=("adapters_off", "separate", "cached"), default=None,
                     help="default: from the config (cached with dpo.precompute_ref/ref_cache)")
    mem.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    c = sub.add_parser("cache", help="list the reference log-prob caches; --max-gib N prunes the least recently used")
    c.add_argument("--max-gib", type=float, default=None, help="delete the least recently used until at most N GiB")
    c.add_argument("--dir", default=None, help="cache root (default: $DPO_LAB_CACHE or build/cache)")
    t = sub.add_parser("train", help="train (dpo-lab train dpo --config FILE ...)", add_help=False)
    t.add_argument("kind")
    args, rest = p.parse_known_args(argv)
    if args.cmd == "train":
        return cmd_train(args, rest)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    t0 = time.perf_counter()
    code = {"list": cmd_list, "run": cmd_run, "bench": cmd_bench, "student": cmd_student,
            "exercises": cmd_exercises, "memory": cmd_memory, "cache": cmd_cache}[args.cmd](args)
    if args.cmd == "run":
        print(f"total {time.perf_counter() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
