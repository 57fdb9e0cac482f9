"""Named progress: a live display on a terminal, one line per step in a log, nothing in CI or under --quiet."""

import io

import pytest

from learned_router import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def use_stderr(monkeypatch, out):
    """Write stderr to `out` (in the test's body: pytest's capture resets sys.stderr after fixtures)."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr", out)
    return out


def test_a_terminal_sees_each_named_step_with_its_count_nested_steps_included(monkeypatch):
    stderr = use_stderr(monkeypatch, Terminal())
    with progress.step("fitting the quality model", total=4) as fit:
        with progress.step("embedding 1,024 prompts", total=1024) as embed:
            embed.advance(1024)
        for _ in range(4):
            fit.advance()
    text = stderr.getvalue()
    assert "fitting the quality model" in text and "4/4" in text
    assert "embedding 1,024 prompts" in text and "1,024/1,024" in text and "✓" in text


def test_a_log_gets_one_plain_line_per_step_and_label(monkeypatch):
    out = use_stderr(monkeypatch, io.StringIO())  # not a terminal
    with progress.step("report: 2 benchmarks") as bar:
        bar.advance()
        bar.describe("[1/2] gsm8k (by prompt)")
    assert out.getvalue() == "report: 2 benchmarks\n[1/2] gsm8k (by prompt)\n"


@pytest.mark.parametrize("ci, quiet", [("true", False), ("1", False), ("", True)])
def test_ci_and_quiet_show_nothing(monkeypatch, ci, quiet):
    stderr = use_stderr(monkeypatch, Terminal())
    monkeypatch.setenv("CI", ci)
    with progress.quiet(quiet), progress.step("embedding 3 prompts", total=3) as bar:
        bar.advance(3)
        bar.describe("elsewhere")
    assert stderr.getvalue() == ""
    assert progress.mode() == (None if ci else "live")  # quiet() ends with its block


def test_library_bars_are_off_inside_and_as_they_were_after():
    from transformers.utils import logging as hf_logging

    for before in (True, False):
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
        with progress.no_library_bars():
            assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.is_progress_bar_enabled() is before
    hf_logging.enable_progress_bar()


def test_embedding_says_how_long_it_will_take_after_its_first_chunk(monkeypatch, tmp_path):
    from learned_router.embed import Encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LEARNED_ROUTER_CACHE", str(tmp_path))
    out = use_stderr(monkeypatch, io.StringIO())
    Encoder(layers=1).embed([f"prompt {i} about the weather" for i in range(100)], batch_size=8)
    first, eta = out.getvalue().splitlines()
    assert first == "embedding 100 prompts" and eta.startswith("embedding 100 prompts: about ") and "prompts/s" in eta
