"""dispatch.parse: the regular argv of commands declared in options.py, parsed without
argparse, must mean exactly what argparse makes of it, and anything else is left to
argparse (None)."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supermachine.cli import app, dispatch

#: words around `pull`'s options, right and wrong: argparse and parse must agree on any mix
WORDS = ["pull", "images", "ps", "REF", "alpine:3", "-", "", "a b", "-1", "--", "-h", "--help",
         "--platform", "--platform=linux/arm64", "linux/amd64", "--plat", "--platform=",
         "--insecure-registry", "--insecure-registry=h:5000", "h:5000", "--ca-file", "x.pem",
         "-q", "--quiet", "--quiet=1", "-qv", "-x", "--debug", "-v", "--verbose", "--home",
         "/h", "--home=/h2", "--version"]
GLOBAL_WORDS = ["--debug", "-v", "--verbose", "--home", "/h", "--home=/h2", "-q", "--hom"]
#: `pull`'s own words, rightly spelled (their order and count may still be wrong)
PULL_WORDS = ["REF", "-q", "--quiet", "--platform", "linux/amd64", "--platform=linux/arm64",
              "--insecure-registry", "h:5000", "--insecure-registry=h:5000", "--ca-file", "x.pem",
              "-", ""]

#: argv shaped like a command line (global options, a command, then its words), so that
#: a good share of the examples is one parse accepts
command_lines = st.builds(
    lambda globals_, command, rest: [*globals_, command, *rest],
    st.lists(st.sampled_from(GLOBAL_WORDS), max_size=3),
    st.sampled_from(["pull", "pull", "pull", "images", "ps", "REF"]),
    st.lists(st.sampled_from(PULL_WORDS), max_size=6))


def _argparse(argv: list[str]) -> dict | None:
    """What argparse makes of ``argv``: its namespace, or None where it refuses (or prints
    help or the version and exits)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return vars(app.build_parser().parse_args(argv))
        except SystemExit:
            return None


GOOD_GLOBALS = [["--debug"], ["-v"], ["--verbose"], ["--home", "/h"], ["--home=/h2"]]
GOOD_OPTIONS = [["-q"], ["--quiet"], ["--platform", "linux/amd64"], ["--platform="],
                ["--platform=linux/arm64"], ["--insecure-registry", "h:5000"],
                ["--insecure-registry=a"], ["--ca-file", "x.pem"]]

#: well-formed `pull` command lines: global options, pull, its options with the reference
#: somewhere among them
regular_lines = st.builds(
    lambda globals_, options, at, ref: [
        *sum(globals_, []), "pull", *sum(options[:at], []), ref, *sum(options[at:], [])],
    st.lists(st.sampled_from(GOOD_GLOBALS), max_size=3),
    st.lists(st.sampled_from(GOOD_OPTIONS), max_size=5),
    st.integers(0, 5), st.sampled_from(["REF", "h:5000/a/b@sha256:00", "-", ""]))


@settings(max_examples=300, deadline=None)
@given(regular_lines)
def test_well_formed_lines_are_parsed_without_argparse(argv):
    """Every well-formed pull line is one parse accepts (so the test below is not vacuous)."""
    _check(argv, accepted=True)


def _check(argv: list[str], accepted: bool = False) -> None:
    parsed = dispatch.parse(argv)
    assert parsed is not None or not accepted
    if parsed is not None:
        assert vars(parsed) == _argparse(argv)


@settings(max_examples=600, deadline=None)
@given(st.one_of(command_lines, st.lists(st.sampled_from(WORDS), max_size=7)))
def test_a_regular_parse_means_what_argparse_makes_of_it(argv):
    _check(argv)


@pytest.mark.parametrize("argv", [
    ["pull", "REF"],
    ["pull", "-q", "--insecure-registry", "127.0.0.1:5000", "127.0.0.1:5000/a/b:c"],
    ["--home", "/h", "--debug", "pull", "REF", "--platform=linux/arm64", "--quiet"],
    ["-v", "--home=/h", "pull", "--insecure-registry", "a", "--insecure-registry=b", "--ca-file",
     "ca.pem", "-", "--platform", ""],
])
def test_the_usual_command_lines_are_parsed_without_argparse(argv):
    parsed = dispatch.parse(argv)
    assert parsed is not None
    assert vars(parsed) == _argparse(argv)


@pytest.mark.parametrize("argv", [
    [], ["pull"], ["pull", "a", "b"], ["pull", "--help"], ["pull", "--insecure", "h", "REF"],
    ["pull", "--platform", "-q", "REF"], ["pull", "--", "REF"], ["pull", "-qv", "REF"],
    ["pull", "--debug", "REF"], ["-q", "pull", "REF"], ["ps"], ["nope", "REF"],
])
def test_anything_else_is_left_to_argparse(argv):
    assert dispatch.parse(argv) is None
