"""Helper for scripts/ui_screenshots.sh: what the demo store lacks, the pages to shoot, the browser's settings.

    python scripts/ui_screenshots.py missing                 # demo jobs the store still needs, in order
    python scripts/ui_screenshots.py wait URL [SECONDS]      # until URL answers (exit 1 on timeout)
    python scripts/ui_screenshots.py seed-server PORT        # serves seed_page() at http://127.0.0.1:PORT/seed
    python scripts/ui_screenshots.py pages MLFLOW_URL DASHBOARD_URL   # "name<TAB>url" per screenshot
    python scripts/ui_screenshots.py click-shot PROFILE URL OUT.png WIDTH,HEIGHT TEXT_REGEX
        # Chromium over its DevTools protocol: open URL, click the elements whose text matches, screenshot

Runs, the model and the experiment are looked up with the MLflow client in ``MLFLOW_TRACKING_URI``
(the script points it at ``mlflow.db`` in the repository root); the study id through optuna-dashboard's
``/api/studies``.  Overrides: ``SMP_UI_RUN_ID`` (the training run shown; default: the champion's run if
it logged plots, else the newest finished top-level run with plots), ``SMP_UI_MODEL`` (registered model,
default smp-popularity), ``SMP_UI_STUDY`` (study name; default: the one with most trials),
``SMP_UI_METRICS`` (comma-separated metric columns of the runs list), ``SMP_UI_CHART_FILTER`` (regex of the
charts shown on the run's "Model metrics" tab; default: its learning curves).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

MODEL = os.environ.get("SMP_UI_MODEL", "smp-popularity")
SKIP_JOBS = ("tune", "compare", "promote")  # top-level runs that are no training run
# metric columns for the runs list, the first ones the run has (the metric keys may change: see the fallback)
METRIC_COLUMNS = ("val_rmse", "test_rmse", "test_mae", "test_spearman")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _get(url: str, timeout: float = 10.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as resp:
        return resp.read()


def _client():
    import mlflow

    return mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def missing() -> list[str]:
    """The demo jobs to run: a training run with a model, a study with trials, a champion."""
    import optuna

    if not os.path.exists("mlflow.db"):
        return ["ensemble_mlp", "tune", "promote"]
    client = _client()
    need = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'", max_results=1000) if experiments else []
    if not any(r.outputs and r.outputs.model_outputs and "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("smp.job") not in SKIP_JOBS for r in runs):
        need.append("ensemble_mlp")
    studies = optuna.get_all_study_summaries("sqlite:///optuna.db") if os.path.exists("optuna.db") else []
    if not any(s.n_trials for s in studies):
        need.append("tune")
    try:
        client.get_model_version_by_alias(MODEL, "champion")
    except Exception:  # noqa: BLE001 - no such model or alias
        need.append("promote")
    if need and "promote" not in need:
        need.append("promote")  # a new run may beat the champion
    return need


def wait(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            _get(url, timeout=3)
            return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    sys.exit(f"{url} did not answer within {seconds:.0f}s ({last})")


def _plots(client, run_id: str) -> list[str]:
    return sorted(a.path for a in client.list_artifacts(run_id, "plots") if a.path.endswith(".png"))


def choose() -> dict:
    """The champion version, the training run shown (and its experiment, first plot, metric columns)."""
    client = _client()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    run_id = os.environ.get("SMP_UI_RUN_ID")
    if not run_id:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "attributes.status = 'FINISHED'", max_results=1000,
                                  order_by=["attributes.start_time DESC"])
        runs.sort(key=lambda r: r.info.run_id != champion.run_id)  # the champion's run first
        for run in runs:
            if "mlflow.parentRunId" in run.data.tags or run.data.tags.get("smp.job") in SKIP_JOBS:
                continue
            if _plots(client, run.info.run_id):
                run_id = run.info.run_id
                break
        if not run_id:
            sys.exit("no finished training run with plots/ in the store (mlflow run . -e ensemble_mlp)")
    run = client.get_run(run_id)
    plots = _plots(client, run_id)
    plot = next((p for p in plots if "pred_vs_actual" in p), plots[0] if plots else None)
    metrics = [m for m in os.environ.get("SMP_UI_METRICS", "").split(",") if m]
    if not metrics:
        metrics = [m for m in METRIC_COLUMNS if m in run.data.metrics]
    if len(metrics) < 2:  # renamed keys: any RMSE-like metrics
        metrics = sorted(m for m in run.data.metrics if "rmse" in m)[:4]
    # the run's charts tab: its learning curves (metrics logged at several steps), else its RMSE metrics
    curves = sorted(k for k in run.data.metrics if len(client.get_metric_history(run_id, k)) > 1)
    chart_filter = os.environ.get("SMP_UI_CHART_FILTER") or (
        "^(" + "|".join(re.escape(k) for k in curves) + ")$" if curves else "rmse")
    in_experiment = client.search_runs([run.info.experiment_id], max_results=1000)
    parents = sorted({r.data.tags["mlflow.parentRunId"] for r in in_experiment if "mlflow.parentRunId" in r.data.tags})
    return {"experiment_id": run.info.experiment_id, "run_id": run_id, "plot": plot,
            "champion_version": champion.version, "metrics": metrics, "parents": parents[:20],
            "chart_filter": chart_filter}


def seed_items(chosen: dict) -> dict:
    """localStorage entries for the MLflow UI 3.17 (read from its bundle: settings under key + "_v1"; the runs
    table's state under MLflowLocalStorage-1.1-ExperimentPage-<JSON list of experiment ids>-ReactComponentState,
    a run's charts under MLflowLocalStorage-1.1-RunPage-<run id>-model-chartUIState; values are JSON)."""
    columns = ["attributes.`Models`"] + [f"metrics.`{m}`" for m in chosen["metrics"]]
    table = f"MLflowLocalStorage-1.1-ExperimentPage-{json.dumps([chosen['experiment_id']])}-ReactComponentState"
    return {
        "mlflow.workflowType_v1": "machine_learning",        # "Model training" sidebar, not "GenAI"
        "mlflow.assistant.panelOpen_v1": False,               # the Assistant panel would cover a third
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,  # ... and opens itself on a first visit
        # metric columns instead of Source/Dataset; parent runs (a study, a job's upstream runs) expanded
        table: {"selectedColumns": columns, "runsExpanded": {p: True for p in chosen["parents"]}},
        # the run page's "Model metrics" tab: only the charts whose metric matches (a regex, as typed in its search box)
        f"MLflowLocalStorage-1.1-RunPage-{chosen['run_id']}-model-chartUIState": {
            "isAccordionReordered": False, "autoRefreshEnabled": False, "chartsSearchFilter": chosen["chart_filter"],
            "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""}},
    }


def seed_page(items: dict) -> str:
    """A page that stores ``items`` in localStorage: opened once from the MLflow server's origin before the
    server starts, it leaves the browser profile with these settings."""
    sets = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});" for k, v in items.items())
    return ("<!doctype html><html><body><script>" + sets
            + "document.body.textContent = 'seeded ' + localStorage.length;</script></body></html>")


def seed_server(port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    page = seed_page(seed_items(choose())).encode()

    class Seed(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = page if self.path == "/seed" else b""
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Seed).serve_forever()


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--run-all-compositor-stages-before-draw"]
# every innermost element whose whole text matches (e.g. the schema's collapsed "Inputs (15)" row), clicked
_CLICK_JS = """(() => { const re = new RegExp(%s), hit = e => re.test(e.textContent.trim());
  const els = [...document.querySelectorAll('body *')].filter(e => hit(e) && ![...e.children].some(hit));
  els.forEach(e => e.click()); return els.length > 0; })()"""


def click_shot(profile: str, url: str, out: str, size: str, text: str, timeout: float = 60.0) -> None:
    """Screenshot ``url`` after clicking the elements whose text matches ``text`` (what ``--screenshot`` cannot:
    MLflow's model version page opens its schema collapsed).  Headless Chromium driven over the DevTools
    protocol with aiohttp (an MLflow dependency); nothing else to install."""
    import asyncio
    import base64
    import subprocess

    import aiohttp

    width, height = size.split(",")
    port_file = os.path.join(profile, "DevToolsActivePort")
    if os.path.exists(port_file):
        os.remove(port_file)
    proc = subprocess.Popen([os.environ.get("CHROMIUM", "/usr/bin/chromium"), *CHROME_FLAGS,
                             f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    async def drive() -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            await asyncio.sleep(0.2)
        port = open(port_file).read().split()[0]
        async with aiohttp.ClientSession(trust_env=False) as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                page = next(t for t in await resp.json() if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10**6))

                async def call(method: str, **params):
                    msg_id = next(ids)
                    await ws.send_json({"id": msg_id, "method": method, "params": params})
                    while True:
                        msg = await asyncio.wait_for(ws.receive_json(), max(1.0, deadline - time.monotonic()))
                        if msg.get("id") == msg_id:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})

                await call("Page.enable")
                await call("Page.navigate", url=url)
                clicked = False
                while time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    res = await call("Runtime.evaluate", expression=_CLICK_JS % json.dumps(text), returnByValue=True)
                    if res.get("result", {}).get("value"):
                        clicked = True
                        break
                if not clicked:
                    raise RuntimeError(f"nothing matching {text!r} on {url} within {timeout:.0f}s")
                await asyncio.sleep(2.0)  # the expanded rows render
                shot = await call("Page.captureScreenshot", format="png")
                with open(out, "wb") as f:
                    f.write(base64.b64decode(shot["data"]))

    try:
        asyncio.run(drive())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def pages(mlflow_url: str, dashboard_url: str) -> list[tuple[str, str]]:
    """The screenshots: (file stem, URL)."""
    c = choose()
    run_url = f"{mlflow_url}/#/experiments/{c['experiment_id']}/runs/{c['run_id']}"
    studies = json.loads(_get(f"{dashboard_url}/api/studies"))["study_summaries"]
    wanted = os.environ.get("SMP_UI_STUDY")
    if wanted:
        studies = [s for s in studies if s["study_name"] == wanted]
    if not studies:
        sys.exit(f"optuna-dashboard lists no study{' named ' + wanted if wanted else ''}")
    sizes = {s["study_id"]: len(json.loads(_get(f"{dashboard_url}/api/studies/{s['study_id']}"))["trials"])
             for s in studies}
    study_id = max(sizes, key=sizes.get)
    model = urllib.parse.quote(MODEL, safe="")
    return [
        ("mlflow_runs", f"{mlflow_url}/#/experiments/{c['experiment_id']}/runs"),
        ("mlflow_run_overview", run_url),
        ("mlflow_run_metrics", f"{run_url}/model-metrics"),
        ("mlflow_run_artifacts", f"{run_url}/artifactPath/{c['plot']}" if c["plot"] else f"{run_url}/artifacts"),
        ("mlflow_model", f"{mlflow_url}/#/models/{model}"),
        ("mlflow_model_version", f"{mlflow_url}/#/models/{model}/versions/{c['champion_version']}"),
        ("optuna_study", f"{dashboard_url}/dashboard/studies/{study_id}"),
    ]


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "missing":
        print(" ".join(missing()))
    elif cmd == "wait":
        wait(args[0], float(args[1]) if len(args) > 1 else 120.0)
    elif cmd == "seed-server":
        seed_server(int(args[0]))
    elif cmd == "click-shot":
        click_shot(*args[:5])
    elif cmd == "pages":
        for name, url in pages(args[0].rstrip("/"), args[1].rstrip("/")):
            print(f"{name}\t{url}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:] or ["help"])
