"""The terminal look shared by the suite's live display and `prepare` (rich)."""


def progress_bar(console, unit: str = ""):
    """The project's rich progress bar: description, bar, done/total [unit], elapsed, remaining."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *([TextColumn(unit)] if unit else []), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
