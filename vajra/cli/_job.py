"""``vajra job``: a tenant's training jobs — ``status ID [--follow]``, ``list``, ``cancel ID``,
``resume ID``. ``--follow`` draws a progress bar (rich) until the job finishes; the exit code
is then 0 if it succeeded, 1 if it failed or was cancelled (docs/training-jobs.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

from vajra.cli._common import api_key, gateway_address, load_args_config, with_config

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.client import Client, JobInfo, TrainingJob


def add_client_flags(sp: argparse.ArgumentParser, timeout: float = 120.0) -> None:
    """The flags every job command takes: key, gateway, timeout, JSON output."""
    sp.add_argument("--key", help="API key (default: $VAJRA_API_KEY)")
    sp.add_argument(
        "--gateway",
        help="gateway address, e.g. tcp://127.0.0.1:5555 (default: the running cluster's)",
    )
    sp.add_argument(
        "--timeout", type=float, default=timeout, help="seconds per call (default: %(default)s)"
    )
    sp.add_argument("--json", action="store_true", help="print JSON (default: text)")


def register(sub: Subcommands) -> None:
    job = with_config(sub.add_parser("job", help="status, list, cancel and resume training jobs"))
    jsub = job.add_subparsers(dest="job_cmd", required=True)
    status = jsub.add_parser("status", help="a job's state; --follow: until it finishes")
    status.add_argument("job_id", metavar="ID")
    status.add_argument("--follow", action="store_true", help="show progress until finished")
    status.add_argument(
        "--follow-timeout", type=float, default=86_400.0, help="seconds (default: a day)"
    )
    lst = jsub.add_parser("list", help="your newest jobs, newest first")
    lst.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    for name, text in (("cancel", "cancel a job"), ("resume", "resume from the checkpoint")):
        jsub.add_parser(name, help=text).add_argument("job_id", metavar="ID")
    for sp in jsub.choices.values():
        add_client_flags(sp)
    job.set_defaults(func=cmd_job)


def client_for(args: argparse.Namespace) -> Client:
    from vajra.client import Client

    cfg = load_args_config(args)
    return Client(gateway_address(cfg, args), api_key(args), timeout_s=args.timeout)


def cmd_job(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.job_cmd == "list":
            infos = client.jobs(limit=args.limit)
            if args.json:
                print(json.dumps([job_json(i) for i in infos]))
            else:
                print("JOB\tADAPTER\tSTATUS\tSTEP\tLOSS\tCOST_USD\tRESULT")
                for i in infos:
                    print(
                        f"{i.job_id}\t{i.adapter}\t{i.status}\t{i.step}/{i.total_steps}\t"
                        f"{i.loss:.4f}\t{i.cost_usd:.6f}\t{_version(i)}"
                    )
            return 0
        job = client.job(args.job_id)
        if args.job_cmd == "cancel":
            show(job.cancel(), args.json)
        elif args.job_cmd == "resume":
            show(job.resume(), args.json)
        elif args.follow:
            return follow(job, args.json, args.follow_timeout)
        else:
            show(job.status(), args.json)
    return 0


def job_json(info: JobInfo) -> dict[str, Any]:
    return dataclasses.asdict(info)


def _version(info: JobInfo) -> str:
    return "" if info.result_version is None else f"{info.adapter}@{info.result_version}"


def summary(info: JobInfo) -> str:
    """One line for a job: its state, progress and outcome."""
    text = (
        f"job {info.job_id} ({info.adapter}) {info.status}: step {info.step}/"
        f"{info.total_steps}, epoch {info.epoch}, loss {info.loss:.4f}, "
        f"{info.tokens} tokens, ${info.cost_usd:.6f}"
    )
    if info.result_version is not None:
        text += f"; trained version {_version(info)}"
    if info.error:
        text += f"; error: {info.error}"
    return text


def show(info: JobInfo, as_json: bool) -> None:
    print(json.dumps(job_json(info)) if as_json else summary(info))


def follow(job: TrainingJob, as_json: bool, timeout_s: float) -> int:
    """Show the job's progress until it finishes; 0 if it succeeded, else 1."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    last: JobInfo | None = None
    if as_json:
        for info in job.follow(timeout_s=timeout_s):
            last = info
            print(json.dumps(job_json(info)), flush=True)
    else:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, transient=not sys.stdout.isatty()) as bar:
            task = bar.add_task(job.job_id, total=None, loss="-")
            for info in job.follow(timeout_s=timeout_s):
                last = info
                bar.update(
                    task,
                    description=f"{info.job_id} {info.status}",
                    total=info.total_steps or None,
                    completed=info.step,
                    loss=f"{info.loss:.4f}" if info.step else "-",
                )
        if last is not None:
            print(summary(last))
    return 0 if last is not None and last.status == "succeeded" else 1
