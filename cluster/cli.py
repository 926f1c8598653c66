"""`hybrid-serve`: start the cluster, ask it questions, feed it documents."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hybrid_serve import __version__
from hybrid_serve.config import PROFILES, HybridServeConfig
from hybrid_serve.schemas import DEFAULT_COLLECTION

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
BATCH_BYTES = 1_000_000


def default_url() -> str:
    if os.environ.get("HYBRID_SERVE_URL"):
        return os.environ["HYBRID_SERVE_URL"].rstrip("/")
    try:
        port = HybridServeConfig.load().http.port
    except Exception:
        port = 8000
    return f"http://127.0.0.1:{port}"


def _error_message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:300] or r.reason_phrase


# -- up ------------------------------------------------------------------------------------------


def _up_config(args: argparse.Namespace) -> HybridServeConfig:
    """The configuration `up` runs: the file, the environment, the flags."""
    return HybridServeConfig.load(
        args.config,
        overrides={"http.port": args.port, "data_dir": args.data_dir, "http.host": args.host},
    )


def _reload(args: argparse.Namespace, cfg: HybridServeConfig, joined: bool) -> HybridServeConfig:
    """SIGHUP: read the configuration again and apply it; the running one stays on any error."""
    from hybrid_serve.cluster import local

    started = time.monotonic()
    try:
        new = _up_config(args)
        if joined:
            new, _ = local.fit_to_cluster(new)
        restarted = local.redeploy(cfg, new)
    except Exception as exc:
        err.print(f"[red]reload refused; still serving the previous configuration:[/] {exc}")
        return cfg
    took = time.monotonic() - started
    if restarted:
        console.print(
            f"reloaded in {took:.1f} s; new replicas for: {', '.join(restarted)} (their own "
            "settings changed); everything else in place"
        )
    else:
        console.print(f"reloaded in {took:.1f} s; every change applied in place, no new replicas")
    return new


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the `up` serving this data_dir to read its configuration again (SIGHUP)."""
    from hybrid_serve.cluster import local

    try:
        cfg = HybridServeConfig.load(args.config, overrides={"data_dir": args.data_dir})
        pid = local.up_pid(cfg)
    except Exception as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        return 1
    os.kill(pid, signal.SIGHUP)
    console.print(f"asked hybrid-serve up (pid {pid}) to reload; it prints what changed")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from hybrid_serve.cluster import local

    local.use_local_token()  # before anything imports Ray
    try:
        cfg = _up_config(args)
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        return 2
    started = time.monotonic()
    try:
        joining = not args.new_cluster and bool(
            args.address or os.environ.get("RAY_ADDRESS") or local.discovered_address()
        )
        if not joining:  # a joined cluster's Serve may hold the port already
            local.check_port_free(cfg.http.host, cfg.http.port)
    except local.StartupError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        return 1

    stop = threading.Event()
    reload_asked = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    def handle_stop_signals() -> None:
        # Set explicitly: a shell that starts us in the background hands us SIGINT ignored, and
        # Ray's core installs its own SIGTERM handler (a stack dump, then exit) in ray.init.
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        # SIGHUP (or `hybrid-serve reload`): read the configuration again, do not die.
        signal.signal(signal.SIGHUP, lambda *_: reload_asked.set())

    handle_stop_signals()
    console.print(f"hybrid-serve {__version__} — data in {cfg.data_dir}")
    target: local.RayTarget | None = None
    try:
        if not joining and (note := local.ensure_tier_key(cfg)):
            console.print(f"  {note}")
        with console.status("starting Ray…") as status:
            target = local.init_ray(
                cfg, args.metrics_port, address=args.address, new_cluster=args.new_cluster
            )
            handle_stop_signals()  # ours again: Ctrl-C, `docker stop`, Kubernetes stop cleanly
            console.print(f"  {target.note}")
            if target.joined:
                cfg, fitted = local.fit_to_cluster(cfg)
                if fitted:
                    console.print(f"  [yellow]{escape(fitted)}[/]")
            status.update("deploying…")
            url = local.deploy(
                cfg,
                on_status=lambda line: status.update(escape(line)),
                on_note=lambda line: console.print(f"  {escape(line)}"),
            )
        console.print(
            f"[green]ready[/] in {time.monotonic() - started:.1f} s — serving on [bold]{url}[/]"
        )
        console.print(f'  try: hybrid-serve ask "How do I add documents?" --url {url}')
        if cfg.llm.deploy.enabled:
            console.print(
                f"  LLM tier: {cfg.llm.model} on vLLM, Messages API at "
                f"{url}{cfg.llm.deploy.route_prefix}/v1/messages (behind its key, "
                f"${cfg.llm.api_key_env})"
            )
        if args.metrics_port and not target.joined:
            console.print(
                f"  metrics: http://127.0.0.1:{args.metrics_port}/metrics (Prometheus; "
                "hybrid_serve_* are scraped as ray_hybrid_serve_*)"
            )
        if not cfg.http.api_keys:
            console.print(
                f"  [yellow]no API keys configured: anyone who can reach {cfg.http.host}:"
                f"{cfg.http.port} can use the API[/] (set http.api_keys)"
            )
        local.write_pid(cfg)
        console.print("  Ctrl-C to stop; `hybrid-serve reload` (or SIGHUP) reads the config again")
        sys.stdout.flush()
        while not stop.is_set():
            if reload_asked.is_set():
                reload_asked.clear()
                cfg = _reload(args, cfg, target.joined)
                sys.stdout.flush()
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except local.StartupError as exc:
        err.print(f"[red]start-up failed:[/] {escape(str(exc))}")
        if target is not None:
            local.shutdown(cfg, target)
        return 1
    console.print("shutting down…")
    local.shutdown(cfg, target)
    joined = target is not None and target.joined
    console.print("stopped" + (" (the joined Ray cluster keeps running)" if joined else ""))
    return 0


# -- ask -----------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    from hybrid_serve.cluster.local import client_headers

    url = (args.url or default_url()).rstrip("/")
    try:
        r = httpx.post(
            f"{url}/v1/answer",
            json={"query": args.question, "top_k": args.top_k, "mode": args.mode},
            headers=client_headers(args.api_key),
            timeout=300,
        )
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot reach {url}:[/] {escape(str(exc))} — is `hybrid-serve up` running?")
        return 1
    if r.status_code != 200:
        err.print(f"[red]{r.status_code}:[/] {escape(_error_message(r))}")
        return 1
    body = r.json()
    if args.json:
        console.print_json(data=body)
        return 0
    console.print(escape(body["answer"]) or "[dim](empty answer)[/]")
    for st in body.get("subtasks", []):
        console.print(
            f"  [dim]{escape(st['id'])} ({st['status']}, {st['latency_ms']:.0f} ms) "
            f"{escape(st['question'])}[/]"
        )
    if body["citations"]:
        console.print()
        for c in body["citations"]:
            console.print(
                f"  [bold][{c['number']}][/] {escape(c['title'] or c['doc_id'])} "
                f"[dim]({escape(c['doc_id'])}, score {c['score']:.3f})[/]"
            )
            console.print(f"      [dim]{escape(c['snippet'])}[/]")
    u = body["usage"]
    console.print()
    line = (
        f"[dim]route {body['route']} · confidence {body['confidence']:.2f} · "
        f"SLM {u['slm_prompt_tokens']}+{u['slm_completion_tokens']} tokens · "
        f"Claude {u['claude_input_tokens']}+{u['claude_output_tokens']} tokens · "
        f"${u['cost_usd']:.4f}"
    )
    if body["degraded"]:
        line += " · degraded: " + ", ".join(body["degraded"])
    console.print(line + f" · trace {body['trace_id']}[/]")
    return 0


# -- doctor --------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.table import Table

    from hybrid_serve.cluster import doctor

    try:
        cfg = HybridServeConfig.load(args.config)
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        return 2
    status_console = err if args.json else console
    with status_console.status("checking…") as status:
        checks = doctor.run_checks(cfg, progress=lambda name: status.update(f"checking {name}…"))
    if args.json:
        console.print_json(data=doctor.as_json(checks))
    else:
        colours = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
        table = Table(title=f"hybrid-serve {__version__} doctor", show_lines=False)
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for c in checks:
            table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", escape(c.detail))
        console.print(table)
        for c in doctor.failed(checks):
            err.print(f"[red]{c.name} failed[/]: {escape(c.detail)}")
    return 1 if doctor.failed(checks) else 0


# -- k8s render ----------------------------------------------------------------------------------


def _rendered(args: argparse.Namespace, render: Any) -> dict[str, Any] | None:
    """`render(config)` of the profile and file the flags name; None (said why) on bad config."""
    try:
        return render(HybridServeConfig.load(args.config, profile=args.profile))
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        return None


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from hybrid_serve.cluster import k8s

    files = _rendered(args, k8s.render_all)
    if files is None:
        return 2
    if args.out is None:
        sys.stdout.write(k8s.dump(files["rayservice.yaml"]))
        return 0
    out = Path(args.out)
    if out.suffix in (".yaml", ".yml"):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(k8s.dump(files["rayservice.yaml"]))
        err.print(f"wrote {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name, manifest in files.items():
        (out / name).write_text(k8s.dump(manifest))
    err.print(f"wrote {', '.join(files)} to {out}")
    return 0


def cmd_k8s_monitoring(args: argparse.Namespace) -> int:
    from hybrid_serve.cluster import k8s, monitoring

    files = _rendered(args, monitoring.render_monitoring)
    if files is None:
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_text(content if isinstance(content, str) else k8s.dump(content))
    err.print(f"wrote {', '.join(files)} to {out}")
    return 0


# -- bench ---------------------------------------------------------------------------------------


def cmd_bench_load(args: argparse.Namespace) -> int:
    from hybrid_serve.benchmarks import load

    try:
        report = load.run(args)
    except (ValueError, OSError, RuntimeError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    return 0 if report["requests"]["ok"] else 1


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from hybrid_serve.benchmarks import quality

    try:
        quality.run(args)
    except (ValueError, OSError, RuntimeError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from hybrid_serve.benchmarks import quality

    try:
        risk = quality.recalibrate(args)
    except (ValueError, OSError, KeyError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return 2
    return 0 if risk.get("feasible") else 1


# -- index add -----------------------------------------------------------------------------------


# Pseudo-filesystems: their "files" are the kernel's state (a process's environment, secrets
# included), never documents.
PSEUDO_FS = ("/proc", "/sys", "/dev")


def _not_a_document(path: Path, root: Path | None) -> str | None:
    """Why `path` must not be read: it leads out of the folder it was found in (a symlink), or
    it is not a regular file (a FIFO would block, a device never ends)."""
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError) as exc:  # dangling or looping link, no permission
        return f"cannot be read: {exc.strerror if isinstance(exc, OSError) else exc}"
    if root is not None and not real.is_relative_to(root):
        return f"a symbolic link out of {root}; not followed"
    if any(real.is_relative_to(p) for p in PSEUDO_FS) or not stat.S_ISREG(mode):
        return "not a regular file; skipped"
    return None


def _files(paths: Sequence[str]) -> Iterator[tuple[Path, str | None]]:
    """(file, problem) for every candidate; folders recursively, hidden entries skipped, links
    followed only within the folder given."""
    from hybrid_serve.retrieval.records import is_record_file

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            root = p.resolve()
            for top, dirs, names in os.walk(p, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    f = Path(top) / name
                    suffix = f.suffix.lower()
                    wanted = suffix in TEXT_SUFFIXES or suffix == ".pdf" or is_record_file(f)
                    if name.startswith(".") or not wanted:
                        continue
                    yield f, _not_a_document(f, root)
        elif p.exists() or p.is_symlink():
            yield p, _not_a_document(p, None)
        else:
            yield p, "no such file or folder"


def read_document(path: Path) -> dict[str, Any]:
    """JSON document for /v1/documents. The id comes from the absolute path: re-adding replaces."""
    import hashlib

    suffix = path.suffix.lower()
    if suffix == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError as exc:
            raise ValueError("PDF needs the pdf extra: pip install 'hybrid-serve[pdf]'") from exc
        text = "\n\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
    elif suffix in TEXT_SUFFIXES:
        text = path.read_text(encoding="utf-8")
    else:
        raise ValueError(
            f"unsupported file type {suffix or '(none)'}; use .txt, .md, .pdf, .jsonl or .parquet"
        )
    if not text.strip():
        raise ValueError("file has no text")
    title = path.stem
    if suffix in (".md", ".markdown"):
        title = next(
            (ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("# ")), title
        )
    source = str(path.resolve())
    return {
        "id": "file-" + hashlib.sha256(source.encode()).hexdigest()[:20],
        "title": title,
        "text": text,
        "metadata": {"source": source},
    }


def with_collection(doc: dict[str, Any], collection: str | None) -> dict[str, Any]:
    """The document for `collection` (unset: the server puts it in the key's first one)."""
    return {**doc, "collection": collection} if collection else doc


def _progress(label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _post_documents(
    url: str,
    items: Sequence[tuple[str, dict[str, Any]]],
    failures: list[tuple[str, str]],
    headers: dict[str, str],
) -> tuple[int, int | None]:
    """POST in batches of at most 1000 documents and BATCH_BYTES; (added, last index version)."""
    added = 0
    version = None
    with _progress("indexing") as progress:
        task = progress.add_task("documents", total=len(items))
        batch: list[tuple[str, dict[str, Any]]] = []

        def flush() -> None:
            nonlocal added, version
            if not batch:
                return
            try:
                r = httpx.post(
                    f"{url}/v1/documents",
                    json={"documents": [d for _, d in batch]},
                    headers=headers,
                    timeout=600,
                )
            except httpx.HTTPError as exc:
                failures.extend((label, f"cannot reach {url}: {exc}") for label, _ in batch)
            else:
                if r.status_code in (200, 201):
                    added += len(batch)
                    version = r.json().get("index_version")
                else:
                    problem = f"{r.status_code}: {_error_message(r)}"
                    failures.extend((label, problem) for label, _ in batch)
            progress.advance(task, len(batch))
            batch.clear()

        size = 0
        for label, doc in items:
            doc_size = len(doc["text"].encode())
            if batch and (size + doc_size > BATCH_BYTES or len(batch) >= 1000):
                flush()
                size = 0
            batch.append((label, doc))
            size += doc_size
        flush()
    return added, version


def cmd_index_add(args: argparse.Namespace) -> int:
    from hybrid_serve.cluster.local import client_headers
    from hybrid_serve.retrieval.records import BadRecord, FieldNames, is_record_file, read_records

    url = (args.url or default_url()).rstrip("/")
    headers = client_headers(args.api_key)
    fields = FieldNames(args.id_field, args.title_field, args.text_field, args.metadata_field)
    failures: list[tuple[str, str]] = []
    ready: list[tuple[str, dict[str, Any]]] = []
    record_files: list[Path] = []
    for path, problem in _files(args.paths):
        if problem:
            failures.append((str(path), problem))
        elif is_record_file(path):
            record_files.append(path)
        else:
            try:
                ready.append((str(path), with_collection(read_document(path), args.collection)))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                message = (
                    str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                )
                failures.append((str(path), message))
    records: list[tuple[str, dict[str, Any]]] = []
    bulk = args.bulk
    for path in record_files:
        try:
            for line, item in read_records(path, fields):
                if not bulk and len(records) >= args.bulk_threshold:
                    bulk = True  # too many for the server's synchronous path
                if bulk:
                    break
                if isinstance(item, BadRecord):
                    failures.append((f"{path}:{line}", item.reason))
                else:
                    record = item.model_dump(exclude_none=True)
                    records.append((f"{path}:{line}", with_collection(record, args.collection)))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            failures.append((str(path), str(exc)))
    if bulk:
        failures = [f for f in failures if not any(f[0].startswith(f"{p}:") for p in record_files)]
        code = _bulk_add(args, record_files, fields)
        added, version = _post_documents(url, ready, failures, headers) if ready else (0, None)
    else:
        added, version = _post_documents(url, ready + records, failures, headers)
        code = 0
    if not bulk or ready:
        console.print(
            f"added {added} document(s)" + (f"; index version {version}" if version else "")
        )
    for label, problem in failures:
        err.print(f"[red]failed:[/] {escape(label)}: {escape(problem)}")
    return 1 if failures or code else 0


def _bulk_add(args: argparse.Namespace, paths: list[Path], fields: Any) -> int:
    """Record files through the Ray Data pipeline, writing the index directly: on the machine
    (or pod) that mounts the server's data_dir, connected to its Ray cluster when one runs."""
    from hybrid_serve.cluster import ingest, local

    try:
        cfg = HybridServeConfig.load(args.config, overrides={"data_dir": args.data_dir})
    except Exception as exc:
        err.print(f"[red]configuration error:[/] {escape(str(exc))}")
        return 2
    local.use_local_token()
    import ray

    def connect() -> None:
        address = args.address or local.discovered_address()
        ray.init(
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        console.print(f"embedding on {where}")

    console.print(f"bulk ingestion into {cfg.index_dir}")
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[chunks]} chunks"),
            TimeElapsedColumn(),
            console=console,
        ) as bars:
            staged_task = bars.add_task("staged (new or changed)", total=None, chunks="-")
            published_task = bars.add_task("published", total=None, chunks=0)

            def staged(n: int) -> None:
                bars.update(staged_task, completed=n)
                bars.update(published_task, total=n)

            def published(docs: int, chunks: int) -> None:
                bars.update(published_task, completed=docs, chunks=chunks)

            result = ingest.run(
                cfg,
                paths,
                fields,
                workers=args.workers,
                progress=ingest.Progress(staged=staged, published=published),
                connect=connect,
                collection=args.collection or DEFAULT_COLLECTION,
            )
    except (OSError, ValueError, RuntimeError) as exc:
        err.print(f"[red]bulk ingestion failed:[/] {escape(str(exc))}")
        err.print("published segments are kept; run the same command again to resume")
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    console.print(
        f"added {result.documents} document(s), {result.chunks} chunks in {result.segments} "
        f"segment(s), {result.chunks_per_s:.1f} chunks/s with {result.workers} embedding "
        f"worker(s) on {result.device}; {result.unchanged} already indexed, "
        f"{result.duplicates} earlier copies of a repeated id; index version {result.version}"
    )
    for bad in result.bad:
        err.print(f"[red]skipped:[/] {escape(str(bad))}")
    return 1 if result.bad else 0


# -- parser --------------------------------------------------------------------------------------


def _api_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        help="the server's API key (default: $HYBRID_SERVE_API_KEY; never needed for an open API)",
    )


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=list(PROFILES), default="local")
    parser.add_argument("--config", help="YAML configuration file (over the profile)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid-serve",
        description="Small models answer with citations; Claude helps when it adds value.",
    )
    parser.add_argument("--version", action="version", version=f"hybrid-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start (or join) a Ray cluster and serve until Ctrl-C")
    up.add_argument("--config", help="YAML configuration file")
    up.add_argument("--port", type=int, help="HTTP port (config http.port)")
    up.add_argument("--host", help="HTTP bind address (config http.host)")
    up.add_argument("--data-dir", help="where the index lives (config data_dir)")
    where = up.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        help="join this Ray cluster (host:port); default: RAY_ADDRESS, else a cluster `ray "
        "start` left running here, else a new local one",
    )
    where.add_argument(
        "--new-cluster",
        action="store_true",
        help="start a private local Ray cluster even where one is running",
    )
    up.add_argument(
        "--metrics-port",
        type=int,
        help="Ray's Prometheus endpoint on this port (default: one Ray picks; local start only)",
    )
    up.set_defaults(func=cmd_up)

    reload = sub.add_parser(
        "reload",
        help="make the running `up` read its configuration again: tunables (thresholds, keys, "
        "limits, budgets, policies, cache) in place, new replicas only where needed",
    )
    reload.add_argument("--config", help="config YAML (to find its data_dir)")
    reload.add_argument("--data-dir", help="the data_dir of the running `up`")
    reload.set_defaults(func=cmd_reload)

    ask = sub.add_parser("ask", help="ask a running server a question")
    ask.add_argument("question")
    ask.add_argument(
        "--url", help="server URL (default: $HYBRID_SERVE_URL or http://127.0.0.1:PORT)"
    )
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument(
        "--mode", choices=["auto", "slm", "decompose", "claude"], default="auto", help="routing"
    )
    ask.add_argument("--json", action="store_true", help="print the raw JSON response")
    _api_key_argument(ask)
    ask.set_defaults(func=cmd_ask)

    index = sub.add_parser("index", help="manage the document index")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    add = index_sub.add_parser(
        "add",
        help="ingest .txt/.md files (.pdf with the pdf extra), folders, and record files "
        "(.jsonl, .parquet: one document a record)",
    )
    add.add_argument("paths", nargs="+", metavar="PATH")
    add.add_argument("--url", help="server URL (the synchronous path)")
    add.add_argument(
        "--collection",
        help="the documents' collection (default: the API key's first; bulk: default)",
    )
    _api_key_argument(add)
    for name, default in (("id", "id"), ("title", "title"), ("text", "text")):
        add.add_argument(
            f"--{name}-field", default=default, help=f"record field of the {name} ({default})"
        )
    add.add_argument("--metadata-field", default="metadata", help="record field of the metadata")
    add.add_argument(
        "--bulk",
        action="store_true",
        help="record files through the Ray Data pipeline, whatever their size",
    )
    add.add_argument(
        "--bulk-threshold",
        type=int,
        default=5000,
        metavar="N",
        help="records above which the pipeline is used instead of the server (5000)",
    )
    add.add_argument("--workers", type=int, help="embedding actors (default: a GPU or CPU each)")
    add.add_argument(
        "--address",
        help="Ray cluster for the pipeline (default: RAY_ADDRESS, the one `ray start` recorded "
        "here, else a local Ray instance)",
    )
    add.add_argument("--config", help="config YAML of the server (bulk: where its index is)")
    add.add_argument("--data-dir", help="the server's data_dir (bulk)")
    add.set_defaults(func=cmd_index_add)

    doc = sub.add_parser(
        "doctor",
        help="check the installation, the hardware and the configured engine (a generation in a "
        "child process), Ray, the port, the index and, with a key, Claude",
    )
    doc.add_argument("--config", help="YAML configuration file")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.set_defaults(func=cmd_doctor)

    kube = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    kube_sub = kube.add_subparsers(dest="k8s_command", required=True)
    render = kube_sub.add_parser(
        "render", help="the RayService (and volume, Ingress) from the configuration"
    )
    _profile_arguments(render)
    render.add_argument(
        "--out", help="a .yaml file (the RayService) or a folder (all manifests); default: stdout"
    )
    render.set_defaults(func=cmd_k8s_render)
    mon = kube_sub.add_parser(
        "monitoring", help="PodMonitor and Grafana dashboard for the hybrid_serve_* metrics"
    )
    _profile_arguments(mon)
    mon.add_argument("--out", default="k8s/monitoring", help="folder (default: k8s/monitoring)")
    mon.set_defaults(func=cmd_k8s_monitoring)

    bench = sub.add_parser("bench", help="benchmarks against a running endpoint")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    load = bench_sub.add_parser(
        "load", help="load test (open or closed loop, rate sweep) and capacity plan"
    )
    from hybrid_serve.benchmarks import load as load_bench

    load_bench.add_arguments(load)
    load.set_defaults(func=cmd_bench_load)
    quality = bench_sub.add_parser(
        "quality", help="retrieval, answer and citation quality; escalation calibration"
    )
    from hybrid_serve.benchmarks import quality as quality_bench

    quality_bench.add_arguments(quality)
    quality.set_defaults(func=cmd_bench_quality)
    calibrate = sub.add_parser(
        "calibrate",
        help="the escalation threshold that bounds the error rate of SLM-kept answers",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--report", help="a `bench quality` report.json")
    source.add_argument(
        "--from-log",
        nargs="+",
        metavar="PATH",
        help="shadow-verdict logs (files, or folders such as DATA_DIR/shadow)",
    )
    calibrate.add_argument("--out", default="bench-out/calibrate")
    quality_bench.add_risk_arguments(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
