"""The benchmarks' progress line off a terminal: a line every few seconds, not one per step."""

from hybrid_serve.benchmarks.report import Progress


def test_progress_off_a_terminal_prints_phases_and_the_last_step_not_every_step(capsys):
    progress = Progress("t", interval_s=60)
    for i in range(1, 1001):
        progress.step(i, 1000, "answers")
    for i in range(1, 11):
        progress.step(i, 10, "retrieval")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[1] for line in lines] == [
        "answers: 1/1000",
        "answers: 1000/1000",
        "retrieval: 1/10",
        "retrieval: 10/10",
    ]
