"""What every notebook test asserts of its exercises (solution and student versions)."""


def assert_every_check_says_not_implemented_yet(figures):
    """The student version ran to the end, and each of its exercises was checked and found a stub."""
    assert figures["exercises_registered"] >= 1
    assert figures["exercises_checked"] == figures["exercises_registered"]
    assert figures["exercises_todo"] == figures["exercises_registered"]


def assert_every_check_passes(figures):
    assert figures["exercises_registered"] >= 1
    assert figures["exercises_checked"] == figures["exercises_passed"] == figures["exercises_registered"]
