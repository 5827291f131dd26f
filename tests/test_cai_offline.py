"""Offline means offline (issue 13): with allow_download false not one network request leaves the process.

Each check runs in a subprocess whose sitecustomize makes the network unusable and records every attempt
(a TCP/UDP connect, a DNS lookup of a remote name); the test asserts the record is empty. Before the fix, an
`hf:` source sent HEAD requests to huggingface.co (five retries) because HF_DATASETS_OFFLINE was set after
`datasets` had been imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cai_helpers import tiny_model_dir, tiny_run_config  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = textwrap.dedent('''
    import os, socket
    LOG = os.environ["CAI_NET_LOG"]

    def record(what):
        with open(LOG, "a") as f:
            f.write(what + "\\n")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            record(f"connect {address}")
            raise OSError("the network is off in this test")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            record(f"connect_ex {address}")
            return 111
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1", b"localhost"):
            record(f"getaddrinfo {host}")
            raise socket.gaierror("the network is off in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
''')


def run_without_network(tmp_path: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    env.update(PYTHONPATH=f"{site}{os.pathsep}{ROOT}", CAI_NET_LOG=str(log), OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf-home"))  # an empty HF cache: nothing to find locally
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, (log.read_text().splitlines() if log.exists() else [])


def test_the_probe_sees_a_request(tmp_path):
    """The harness itself: a library asked to download does try the network, and the log shows it."""
    done, attempts = run_without_network(tmp_path, ["-c", "import urllib.request as u\n"
                                                          "try: u.urlopen('http://example.com', timeout=5)\n"
                                                          "except OSError: pass"])
    assert done.returncode == 0, done.stderr
    assert attempts == ["getaddrinfo example.com"]


def test_cli_with_an_hf_source_sends_no_request(tiny_model_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir, prompts={"sources": ["hf:cai-test/no-such-set"]})))
    done, attempts = run_without_network(tmp_path, ["-m", "cai.cli", "run", "--config", str(config), "--out",
                                                    str(tmp_path / "run"), "--no-progress"])
    assert attempts == []
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: hf:cai-test/no-such-set: not found locally, and downloads are off")


def test_cli_eval_with_a_hub_model_sends_no_request(tmp_path):
    done, attempts = run_without_network(tmp_path, ["-m", "cai.cli", "eval", "mc", "--data", "builtin:harmless_mc",
                                                    "--model", "cai-test/no-such-model", "--limit", "1"])
    assert attempts == []
    assert done.returncode == 1 and "error: cannot load model 'cai-test/no-such-model' from this machine" in done.stderr


def test_library_calls_send_no_request_and_restore_the_switches(tmp_path):
    """read_records / load_model with allow_download false, in a program that imported the hub libraries first."""
    script = textwrap.dedent('''
        import json, os
        import datasets, huggingface_hub.constants as hub  # imported before cai: their switches are already read
        from cai.data import read_records
        from cai.models import ModelNotFoundError, load_model
        errors = []
        try:
            read_records("hf:cai-test/no-such-set")
        except FileNotFoundError as err:
            errors.append(str(err))
        try:
            load_model("cai-test/no-such-model", device="cpu")
        except ModelNotFoundError as err:
            errors.append(str(err))
        print(json.dumps({"errors": errors, "hub_offline_after": hub.HF_HUB_OFFLINE,
                          "datasets_offline_after": datasets.config.HF_HUB_OFFLINE,
                          "env_after": os.environ.get("HF_HUB_OFFLINE")}))
    ''')
    done, attempts = run_without_network(tmp_path, ["-c", script])
    assert attempts == [] and done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["errors"]) == 2
    assert result["errors"][0].startswith("hf:cai-test/no-such-set: not found locally, and downloads are off")
    assert result["errors"][1].startswith("cannot load model 'cai-test/no-such-model' from this machine")
    # the calling program's own setting (online) is back once cai's calls return
    assert result == dict(result, hub_offline_after=False, datasets_offline_after=False, env_after=None)


@pytest.mark.parametrize("command", [["report", "--out", "RUN"]])
def test_report_sends_no_request(tiny_model_dir, tmp_path, command):
    from cai.config import config_from_dict
    from cai.run import open_run

    config = config_from_dict(tiny_run_config(tiny_model_dir))
    open_run(config, tmp_path / "run", progress=False).run.lock().release()
    done, attempts = run_without_network(tmp_path, ["-m", "cai.cli"] + [str(tmp_path / "run") if a == "RUN" else a
                                                                        for a in command])
    assert attempts == [] and done.returncode == 0, done.stderr[-3000:]
