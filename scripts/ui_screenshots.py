"""Helper for scripts/ui_screenshots.sh: what the demo store lacks, the pages to shoot, the browser.

    python scripts/ui_screenshots.py missing                 # demo jobs the store still needs, in order
    python scripts/ui_screenshots.py wait URL [SECONDS]      # until URL answers (exit 1 on timeout)
    python scripts/ui_screenshots.py pages MLFLOW_URL DASHBOARD_URL
        # "name<TAB>url<TAB>width,height<TAB>actions (JSON)" per screenshot
    python scripts/ui_screenshots.py shot PROFILE URL OUT.png WIDTH,HEIGHT ACTIONS
        # headless Chromium over its DevTools protocol, from the empty profile directory PROFILE: open URL,
        # do what a reader would (close MLflow's Assistant panel, unfold a folded row, type a chart filter),
        # screenshot

Runs, the model and the experiment are looked up with the MLflow client in ``MLFLOW_TRACKING_URI``
(the script points it at ``mlflow.db`` in the demo store's directory, its working directory; ``optuna.db``
beside it); the study id through optuna-dashboard's ``/api/studies``.  Overrides: ``SMP_UI_RUN_ID`` (the
training run shown; default: the champion's run if it logged plots, else the newest finished top-level run
with plots), ``SMP_UI_MODEL`` (registered model, default smp-popularity), ``SMP_UI_STUDY`` (study name;
default: the one with most trials).  Nothing is set in the browser beforehand: each page is shot from a
new, empty profile, as a first visit shows it, after the few clicks listed in ``ACTIONS``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

MODEL = os.environ.get("SMP_UI_MODEL", "smp-popularity")
SKIP_JOBS = ("tune", "compare", "promote")  # top-level runs that are no training run
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

    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    store = os.path.dirname(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else "."
    if not os.path.exists(os.path.join(store, "mlflow.db")):
        return ["ensemble_mlp", "tune", "promote"]
    client = _client()
    need = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "attributes.status = 'FINISHED'", max_results=1000) if experiments else []
    if not any(r.outputs and r.outputs.model_outputs and "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("smp.job") not in SKIP_JOBS for r in runs):
        need.append("ensemble_mlp")
    optuna_db = os.path.join(store, "optuna.db")  # smp tune's default storage: beside mlflow.db
    studies = optuna.get_all_study_summaries(f"sqlite:///{optuna_db}") if os.path.exists(optuna_db) else []
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
    """The champion version, the training run shown (and its experiment, the plot opened)."""
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
    return {"experiment_id": run.info.experiment_id, "run_id": run_id, "plot": plot,
            "champion_version": champion.version}


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--run-all-compositor-stages-before-draw"]  # scrollbars shown: they say where a box holds more

# What a reader does on a page before the picture, as (action, target[, text or "optional"]); nothing is
# stored in the browser beforehand.  MLflow 3.17 opens its Assistant panel on a first visit, over a third of
# the page: every MLflow picture closes it first (optional: a later MLflow may not open it).
CLOSE_ASSISTANT = ("click", 'button[aria-label="Close"]', "optional")
# the +/- beside a parent run's name in the runs table (a study's tune run, a job with upstream runs)
EXPAND_RUN = 'button[data-component-id*="runnamecellrenderer"]'
ACTIONS = {
    "mlflow_runs": [CLOSE_ASSISTANT, ("click_each", EXPAND_RUN)],
    "mlflow_run_overview": [CLOSE_ASSISTANT],
    # only the learning curves and the best epoch, as typed in the "Search metric charts" box (a regex)
    "mlflow_run_metrics": [CLOSE_ASSISTANT, ("type", 'input[placeholder^="Search metric charts"]', "epoch|loss")],
    "mlflow_run_artifacts": [CLOSE_ASSISTANT],
    "mlflow_model": [CLOSE_ASSISTANT],
    # the schema opens folded: unfold "Inputs (N)" and "Outputs (N)"
    "mlflow_model_version": [CLOSE_ASSISTANT, ("click_text", r"^(Inputs|Outputs) \([0-9]+\)$")],
    "optuna_study": [],
}
# window size per picture (default 1600x1000): tall enough for the charts, every schema row, the study's plots
SIZES = {"mlflow_run_metrics": "1600,1150", "mlflow_model_version": "1600,2500", "optuna_study": "1600,1500"}

_FIND_JS = {
    # elements matching a CSS selector
    "css": "[...document.querySelectorAll(%s)]",
    # every innermost element whose whole text matches a regex (e.g. the schema's folded "Inputs (15)" row)
    "text": """(() => { const re = new RegExp(%s), hit = e => re.test(e.textContent.trim());
      return [...document.querySelectorAll('body *')].filter(e => hit(e) && ![...e.children].some(hit)); })()""",
}


def shot(profile: str, url: str, out: str, size: str, actions: str, timeout: float = 60.0) -> None:
    """Screenshot ``url`` in headless Chromium with the (empty) profile directory ``profile``, after the
    ``actions`` (JSON list, see ``ACTIONS``): ``click`` every element matching a CSS selector, ``click_each``
    the matching elements one after another (the runs table redraws after each), ``click_text`` the elements
    whose text matches a regex, ``type`` text into the element matching a CSS selector.  Each waits until its
    target is on the page (at most ``timeout`` s, 15 s when "optional").  Driven over the DevTools protocol
    with aiohttp (an MLflow dependency); nothing else to install."""
    import asyncio
    import base64
    import subprocess

    import aiohttp

    if os.listdir(profile):
        sys.exit(f"{profile} is not empty: each picture is taken from a new, empty browser profile")
    width, height = (int(v) for v in size.split(","))
    steps = json.loads(actions)
    port_file = os.path.join(profile, "DevToolsActivePort")
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
                        msg = await asyncio.wait_for(ws.receive_json(), 30)
                        if msg.get("id") == msg_id:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})

                async def js(expression: str):
                    res = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    return res.get("result", {}).get("value")

                async def wait_for(find: str, optional: bool) -> int:
                    """How many elements ``find`` returns, once there are some (0 if optional and none came)."""
                    until = time.monotonic() + (15.0 if optional else timeout)
                    while time.monotonic() < until:
                        n = await js(f"({find}).length")
                        if n:
                            return n
                        await asyncio.sleep(0.5)
                    if optional:
                        return 0
                    raise RuntimeError(f"nothing matches {find!r} on {url} within {timeout:.0f}s")

                # the viewport itself is WIDTHxHEIGHT (the window's own frame would take some of it)
                await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                           mobile=False)
                await call("Page.enable")
                await call("Page.navigate", url=url)
                await asyncio.sleep(2.0)
                for action, target, *rest in steps:
                    optional = rest[-1:] == ["optional"]
                    kind = "text" if action == "click_text" else "css"
                    find = _FIND_JS[kind] % json.dumps(target)
                    n = await wait_for(find, optional)
                    if not n:
                        print(f"(nothing to {action} on this page: {target})")
                    elif action in ("click", "click_text"):
                        await js(f"({find}).forEach(e => e.click())")
                    elif action == "click_each":
                        for i in range(n):
                            await js(f"(({find})[{i}] || {{click() {{}}}}).click()")
                            await asyncio.sleep(1.0)
                    elif action == "type":
                        await js(f"({find})[0].focus()")
                        await call("Input.insertText", text=rest[0])
                    else:
                        raise ValueError(f"unknown action {action!r}")
                    await asyncio.sleep(1.0)
                await asyncio.sleep(4.0)  # data, charts and unfolded rows render
                png = await call("Page.captureScreenshot", format="png")
                with open(out, "wb") as f:
                    f.write(base64.b64decode(png["data"]))

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
    elif cmd == "shot":
        shot(*args[:5])
    elif cmd == "pages":
        for name, url in pages(args[0].rstrip("/"), args[1].rstrip("/")):
            print(f"{name}\t{url}\t{SIZES.get(name, '1600,1000')}\t{json.dumps(ACTIONS.get(name, []))}")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:] or ["help"])
