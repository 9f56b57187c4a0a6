"""The CLI package's own shape and output: a search response as the terminal shows it (the
critic's status line, each list's rank), `mars --help` loading nothing heavy, and command
modules that share helpers through `mars.cli.common` only."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mars.cli import app, common
from query.schemas import SearchResponse

CLI_DIR = Path(common.__file__).parent


STAGES = {"aligned": "trained", "whitening": "PCA + learned", "prior": "trained", "critic": "ready", "absent": []}


def _response(critic: dict, provenance: dict, fusion: dict | None = None, mode: str = "full",
              stages: dict | None = None) -> SearchResponse:
    return SearchResponse.model_validate({
        "mode": mode, "text": "oak lamp", "has_image": False,
        "lock": {"applied": True, "source": "text", "key": "lamp", "reason": "the text names lamp"},
        "critic": critic, "stages": stages or STAGES, "fusion": fusion or {"k": 60.0, "bm25": 1.0},
        "timings_ms": {"total": 12.4},
        "items": [{"rank": 1, "id": "p-1", "title": "Oak lamp", "type": "Lamp", "colour": "oak", "image": None,
                   "score": 0.0312, "provenance": provenance}],
    })


def _printed(response: SearchResponse, monkeypatch: pytest.MonkeyPatch) -> str:
    out = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, width=200, color_system=None))
    common.print_response(response)
    return out.getvalue()


def test_an_unavailable_critic_prints_its_status_and_why(monkeypatch):
    hits = {"retrievers": {"bm25": {"rank": 2, "score": 7.5}, "text": {"rank": 1, "score": 0.81},
                           "aligned": {"rank": 4, "score": 0.3}}, "fused": {"rank": 1, "score": 0.0312}}
    text = _printed(_response({"backend": "openai", "status": "unavailable", "detail": "timed out after 2.0 s"}, hits,
                              {"k": 10.0, "bm25": 1.0, "text": 1.0, "aligned": 0.5}), monkeypatch)
    critic = next(line for line in text.splitlines() if line.startswith("critic:"))
    assert critic.startswith("critic: unavailable (timed out after 2.0 s), backend openai   fusion:")
    row = next(line for line in text.splitlines() if "p-1" in line)
    assert "2 (7.50)" in row and "1 (0.81)" in row and "4 (0.30)" in row  # rank (score) in each fused list
    header = next(line for line in text.splitlines() if "colour" in line)
    columns = [c for c in header.replace("┃", " ").replace("|", " ").split()]
    assert columns[columns.index("score") + 1:columns.index("fused") + 1] == ["bm25", "text", "aligned", "fused"]
    assert "why" not in header  # the critic did not score


def test_critic_status_without_detail_and_without_backend(monkeypatch):
    scored = _printed(_response({"backend": "learned", "status": "scored", "scored": 1},
                                {"critic": {"score": 0.9, "rationale": "oak matches"}}), monkeypatch)
    assert "critic: scored, backend learned   fusion:" in scored and "oak matches" in scored
    off = _printed(_response({"backend": "none", "status": "not configured"}, {}), monkeypatch)
    assert "critic: not configured   fusion:" in off


def test_the_critic_line_only_in_full_mode_and_one_line_on_absent_stages(monkeypatch):
    from mars.wiring import CRITIC_NOT_SET_UP
    from query.funnel import ABSENT_NOTES

    hybrid = _printed(_response({"backend": "none", "status": "skipped"}, {}, mode="hybrid"), monkeypatch)
    assert "critic" not in hybrid and hybrid.splitlines()[1].startswith("fusion: {'k': 60.0, 'bm25': 1.0}   took: 12 ms")
    assert "stages:" not in hybrid  # nothing absent: no line
    absent = {**STAGES, "aligned": "absent", "whitening": "PCA", "critic": "absent",
              "absent": [ABSENT_NOTES["aligned"], ABSENT_NOTES["learned"]]}
    full = _printed(_response({"backend": "none", "status": "not configured", "detail": CRITIC_NOT_SET_UP}, {},
                              stages=absent), monkeypatch)
    lines = full.splitlines()
    assert lines[1].startswith(f"critic: not configured ({CRITIC_NOT_SET_UP})   fusion:")
    assert lines[2] == f"stages: {ABSENT_NOTES['aligned']} {ABSENT_NOTES['learned']}"


def test_help_lists_every_group_and_loads_nothing_heavy():
    probe = ("import sys; from typer.testing import CliRunner; from mars.cli import app; "
             "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
             "heavy = {'torch', 'faiss', 'transformers', 'sentence_transformers', 'qdrant_edge', 'tantivy', "
             "'sqlalchemy', 'httpx', 'fastapi', 'mars.engine', 'query.funnel'} & set(sys.modules); "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
    names = [c.name for c in app.registered_commands]
    assert names == []  # `mars` only assembles: every command lives in a group module
    listed = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    order = ["ingest", "jobs", "search", "categories", "serve", "eval", "lock-accuracy", "tune", "keys", "rules", "train"]
    positions = [listed.index(f"│ {name} ") for name in order]
    assert positions == sorted(positions)
    train = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    order = ["critic", "category-head", "align", "whitening", "prior", "mine", "label", "sft", "eval-critic", "encoder",
             "text-embedder"]
    positions = [train.index(f"│ {name} ") for name in order]
    assert positions == sorted(positions)


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "mars.cli", "keys", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "create" in result.stdout and "revoke" in result.stdout


def test_command_modules_import_only_common_from_the_cli_package():
    """Module- and function-level imports: a command module may use the shared helpers
    (mars.cli.common, mars.cli.progress), never another command module nor the package (whose
    __init__ imports them all); the progress helper uses common only."""
    for path in sorted(CLI_DIR.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= ({f"{node.module}.{a.name}" for a in node.names} if node.module == "mars.cli"
                             else {node.module})
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        own = {name for name in imported if name == "mars.cli" or name.startswith("mars.cli.")}
        allowed = {"common": set(), "progress": {"mars.cli.common"}}.get(path.stem, {"mars.cli.common", "mars.cli.progress"})
        assert own <= allowed, f"{path.name} imports {sorted(own - allowed)}"
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 600, path.name


def test_mars_search_on_an_untrained_home_says_what_it_lacks(slice_home, encoders, tmp_path, monkeypatch):
    """A real `mars search` on the ingested slice (nothing trained): hybrid prints no critic
    line and one line on the stages it lacked; full prints the plain critic sentence."""
    import shutil

    from mars.engine import Engine
    from mars.settings import Settings
    from mars.wiring import CRITIC_NOT_SET_UP
    from query.funnel import ABSENT_NOTES

    home = shutil.copytree(slice_home, tmp_path / "mars")
    monkeypatch.setattr("mars.cli.search.open_engine", lambda: Engine(Settings(home=home, _env_file=None), encoders=encoders))
    out = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=out, width=300, color_system=None))

    def search(*args: str) -> list[str]:
        out.seek(0)
        out.truncate()
        result = CliRunner().invoke(app, ["search", "a cosy corner to read", "--room", "Bedroom", *args])
        assert result.exit_code == 0, result.output
        return out.getvalue().splitlines()

    hybrid = search()
    assert not any(line.startswith("critic:") for line in hybrid) and hybrid[1].startswith("fusion:")
    assert hybrid[2] == f"stages: {ABSENT_NOTES['aligned']} {ABSENT_NOTES['prior']}"
    full = search("--mode", "full")
    assert full[1].startswith(f"critic: not configured ({CRITIC_NOT_SET_UP})   fusion:") and str(home) not in full[1]
    assert full[2].startswith("stages: ")
    assert search("--mode", "bm25")[2].startswith("┏")  # nothing a keyword search uses is missing: no line
