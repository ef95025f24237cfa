"""`rntp` command line: train, plan, serve, eval, lm-eval, export, sweep, compare, rewards, prepare-model,
prepare-data."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path


def _setup_env() -> None:
    # Offline by default on these machines; users elsewhere can export other values.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _quiet(args: argparse.Namespace, log_file: Path, *, fresh: bool):
    """The terminal gets what a person reads and `log_file` everything (`rntp.console`), unless --verbose."""
    from rntp import console

    if args.verbose:
        return contextlib.nullcontext()
    console.say(f"rntp {args.command}: the full output goes to {log_file} (--verbose: here)")
    return console.captured(log_file, fresh=fresh)


def _serve_secret(secret_file: str | None, dry_run: bool) -> tuple[str, str]:
    """The secret `rntp serve` guards its server with, and where it is (never the secret itself, which
    reaches vLLM in its environment only). A dry run makes no file."""
    from rollout import auth

    if not dry_run:
        return auth.load_secret(secret_file, create=True)
    path, where = auth.secret_location(secret_file)
    if path is not None and not path.exists():
        return "", f"{where}, made at start-up"
    return auth.load_secret(secret_file)


def _listening(host: str, port: int) -> str:
    import ipaddress

    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port} (wherever that name resolves)"
    url = f"http://[{host}]:{port}" if address.version == 6 else f"http://{host}:{port}"
    if address.is_loopback:
        return f"{url}, loopback only (--host 0.0.0.0 lets other machines reach it)"
    if address.is_unspecified:
        return f"port {port} of every interface ({url}): any machine that reaches this one can connect"
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rntp", description="Reasoning via next-token prediction")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a policy (config file plus key.sub=value overrides)")
    p_train.add_argument("--config", help="YAML config file")
    p_train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=5 resume=runs/x")
    verbose = "everything on the terminal (by default vLLM's, torch's and W&B's output goes to the log file only)"
    p_train.add_argument("--verbose", action="store_true", help=verbose + ": <run_dir>/train.log")
    p_plan = sub.add_parser("plan", help="memory per GPU and FLOPs per step of a config, by arithmetic (no weights)")
    p_plan.add_argument("--config", help="YAML config file")
    p_plan.add_argument("--gpus", type=int, default=8, help="training GPUs (default 8)")
    p_plan.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    p_plan.add_argument("--model-shape", help="a built-in shape instead of the model's config.json, e.g. qwen3-1.7b")
    p_plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    p_plan.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.micro_batch=4")
    p_model = sub.add_parser("prepare-model", help="convert the offline default model (SmolLM2-135M) to HF format")
    p_model.add_argument("--force", action="store_true")
    p_data = sub.add_parser("prepare-data", help="build the offline default corpus (stdlib docstrings)")
    p_data.add_argument("--force", action="store_true")
    sub.add_parser("rewards", help="list registered rewards and their formulas")
    p_serve = sub.add_parser("serve", help="start a vLLM server for rollout.sampler=server (args after -- go to vLLM)")
    p_serve.add_argument("--config", help="YAML config (model, data, rollout sections are used)")
    p_serve.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default loopback: only this machine; 0.0.0.0 = every "
                         "interface, for trainers on other nodes; every route but /health needs the shared secret)")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    p_serve.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p_sweep = sub.add_parser("sweep", help="run a sweep file locally or as a SLURM job array")
    p_sweep.add_argument("file")
    p_sweep.add_argument("--dry-run", action="store_true", help="validate and print the runs, run nothing")
    p_cmp = sub.add_parser("compare", help="compare runs and designs across seeds: held-out means with bootstrap "
                           "intervals, differences from a control, Markdown/CSV tables, plots, one HTML report")
    p_cmp.add_argument("runs", nargs="+")
    p_cmp.add_argument("--out", default="runs/compare")
    p_cmp.add_argument("--control", help="the design (or one of its runs) the others are compared with; "
                       "default: the one design with grpo.pg_coef=0, if any")
    p_cmp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p_cmp.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p_eval = sub.add_parser("eval", help="evaluate models/checkpoints on held-out text (fixed, seeded positions)")
    p_eval.add_argument("--model", action="append", required=True,
                        help="a model folder, checkpoint, run folder (base + every checkpoint) or hub name; repeatable")
    p_eval.add_argument("--data", help="held-out data (same formats as training); default: eval.data / data.source")
    p_eval.add_argument("--config", help="YAML config (data, rollout and eval sections are used); default: the "
                        "first run folder's or checkpoint's own config")
    p_eval.add_argument("--out", help="output folder (default: <first model or run>/eval)")
    p_eval.add_argument("--sampler", default="auto", choices=["auto", "vllm", "hf"])
    p_eval.add_argument("--verbose", action="store_true", help=verbose + ": <out>/eval.log")
    p_eval.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.num_positions=64")
    p_export = sub.add_parser("export", help="a plain Hugging Face folder from a checkpoint (a LoRA adapter merged "
                              "into its base), loadable by transformers and vLLM")
    p_export.add_argument("--model", required=True, help="a checkpoint, or a run folder (its newest intact checkpoint)")
    p_export.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p_export.add_argument("--base", help="a LoRA checkpoint's base model (default: the one its adapter_config.json "
                          "names, else the base its rntp_config.yaml describes)")
    p_export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p_export.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the folder (model card included) "
                          "to this Hugging Face Hub model repo, made if new; token from HF_TOKEN or `hf auth login`")
    p_export.add_argument("--private", action="store_true", help="with --push-to-hub: make a new repo private")
    p_export.add_argument("--revision", help="with --push-to-hub: the branch to upload to (made if new; default main)")
    p_lm = sub.add_parser("lm-eval", help="downstream tasks through lm-evaluation-harness, plainly or thinking "
                          "first (results beside the held-out report)")
    p_lm.add_argument("--model", action="append", required=True,
                      help="a model folder, checkpoint or run folder (its base model and last checkpoint); repeatable")
    p_lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p_lm.add_argument("--include", help="a folder of your own lm-eval task YAMLs")
    p_lm.add_argument("--think", default="off", choices=["off", "on", "both"],
                      help="off: lm-eval's HF model as it is; on: one RNTP thought after each context first (its "
                      "budget, temperature and seed from the eval section); both: off then on (default off)")
    p_lm.add_argument("--limit", type=float, help="documents per task (a fraction when below 1)")
    p_lm.add_argument("--num-fewshot", type=int)
    p_lm.add_argument("--batch-size", type=int, default=8)
    p_lm.add_argument("--device", help="default: cuda where available, else cpu")
    p_lm.add_argument("--config", help="YAML config (tags, thought budget); default: the run's own")
    p_lm.add_argument("--out", help="output folder (default: <first model or run>/eval)")
    p_lm.add_argument("--verbose", action="store_true", help=verbose + ": <out>/lm_eval.log")
    p_lm.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. eval.max_thought_tokens=64")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, passthrough = parser.parse_args(argv[:split]), argv[split + 1 :]
    if passthrough and args.command != "serve":
        parser.error("arguments after -- are passed to vLLM by `rntp serve` only")
    _setup_env()

    from rntp import console
    from rntp.config import ConfigError

    try:
        if args.command == "train":
            from rntp import stopping

            stopping.install()  # before the heavy imports: a SIGTERM during start-up exits cleanly
            from rntp.config import load_config

            cfg = load_config(args.config, args.overrides)  # validated before anything heavy loads
            from rntp.runfiles import resumes_inside, run_dir_problem

            # a folder that holds a run is refused before its train.log is touched (start_run checks again for
            # every rank)
            problem = run_dir_problem(Path(cfg.run_dir), resumes_inside(cfg.run_dir, cfg.resume), cfg.overwrite)
            if problem:
                raise ValueError(problem)
            rank = int(os.environ.get("RANK", "0"))
            log_file = Path(cfg.run_dir) / ("train.log" if rank == 0 else f"train.rank{rank}.log")
            with _quiet(args, log_file, fresh=cfg.overwrite and not cfg.resume):
                from rntp.train import train

                train(cfg)
        elif args.command == "plan":
            from rntp.tools.plan import main as plan_main

            print(plan_main(args.config, args.overrides, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb,
                            model_shape=args.model_shape, as_json=args.json))
        elif args.command == "prepare-model":
            from rntp.prepare import prepare_model

            print(prepare_model(force=args.force))
        elif args.command == "prepare-data":
            from rntp.prepare import prepare_corpus

            print(prepare_corpus(force=args.force))
        elif args.command == "eval":
            from rntp.experiments.evaluate import eval_config, run_eval

            overrides = list(args.overrides) + ([f"eval.data={args.data}"] if args.data else [])
            cfg, source = eval_config(args.model, args.config, overrides)  # --config, else the run's own
            out = Path(args.out) if args.out else Path(args.model[0]) / "eval"
            if not args.out and not Path(args.model[0]).is_dir():
                out = Path("runs") / "eval"
            with _quiet(args, out / "eval.log", fresh=True):
                console.say(f"config: {source}")
                report = run_eval(args.model, cfg, out, args.sampler)
                console.say(f"evaluated {len(report['results'])} model(s) on {report['positions']} positions -> "
                            f"{out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.html'}")
        elif args.command == "lm-eval":
            from rntp.experiments.downstream import run_lm_eval
            from rntp.experiments.evaluate import eval_config

            cfg, source = eval_config(args.model, args.config, list(args.overrides))
            out = Path(args.out) if args.out else Path(args.model[0]) / "eval" if Path(args.model[0]).is_dir() \
                else Path("runs") / "eval"
            limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
            with _quiet(args, out / "lm_eval.log", fresh=True):
                console.say(f"config: {source}")
                report = run_lm_eval(args.model, cfg, out, [t for t in args.tasks.split(",") if t],
                                     include=args.include, think=args.think, limit=limit, num_fewshot=args.num_fewshot,
                                     batch_size=args.batch_size, device=args.device)
                console.say(f"lm-eval: {len(report['results'])} result(s) -> {out / 'lm_eval.json'}, "
                            f"{out / 'lm_eval.md'}")
        elif args.command == "export":
            from rntp.publish import export, push_problem, push_to_hub

            if (args.private or args.revision) and not args.push_to_hub:
                raise ValueError("--private and --revision go with --push-to-hub")
            if args.push_to_hub and (problem := push_problem(args.push_to_hub)):
                raise ValueError(problem)  # before anything is written
            out = export(args.model, args.out, base=args.base, dtype=args.dtype)
            print(out)
            if args.push_to_hub:
                try:
                    print(push_to_hub(out, args.push_to_hub, private=args.private, revision=args.revision))
                except Exception as e:  # network, permissions: one line; the exported folder is complete
                    raise ValueError(f"upload to {args.push_to_hub} failed ({type(e).__name__}: {e}); the exported "
                                     f"folder {out} is complete: upload it with "
                                     f"`hf upload {args.push_to_hub} {out}`") from e
        elif args.command == "sweep":
            from rntp.experiments.sweep import run_sweep

            runs = run_sweep(args.file, dry_run=args.dry_run)
            failed = [r["name"] for r in runs if str(r["status"]).startswith("failed")]
            if failed:
                print(f"rntp sweep: failed runs: {', '.join(failed)} (see their train.log)", file=sys.stderr)
                return 1
        elif args.command == "compare":
            from rntp.experiments.compare import compare

            print(compare(args.runs, Path(args.out), control=args.control, resamples=args.resamples, seed=args.seed))
        elif args.command == "serve":
            import shlex

            from transformers import AutoTokenizer

            from rntp.config import load_config, max_sequence_len
            from rntp.think_tokens import base_model_path
            from rollout import ThinkTags
            from rollout.server import serve_command

            cfg = load_config(args.config, args.overrides)
            secret, where = _serve_secret(cfg.rollout.server.secret_file, args.dry_run)  # before anything loads
            path = base_model_path(cfg)  # the model the trainer starts from, tags as tokens included
            tags = ThinkTags(AutoTokenizer.from_pretrained(path), cfg.rollout.open_tag, cfg.rollout.close_tag)
            command, env = serve_command(path, cfg, host=args.host, port=args.port,
                                         max_model_len=max_sequence_len(cfg, tags), vllm_args=passthrough,
                                         secret=secret)
            print(f"rntp serve: listening on {_listening(args.host, args.port)}; every route but /health needs the "
                  f"shared secret (Authorization: Bearer) from {where}", file=sys.stderr, flush=True)
            print(("VLLM_SERVER_DEV_MODE=1 " if args.dry_run else "") + shlex.join(command), flush=True)
            if not args.dry_run:
                os.execvpe(command[0], command, env)  # the server takes this process's place and signals
        elif args.command == "rewards":
            from rewards import REWARDS

            width = max(map(len, REWARDS))
            for name in sorted(REWARDS):
                print(f"{name:<{width}}  {REWARDS[name].formula}")
    except (ConfigError, OSError, KeyError, ValueError) as e:  # user errors: one line, no traceback
        # printed once `captured` has given the terminal back; the log file holds the traceback
        print(f"rntp {args.command}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
