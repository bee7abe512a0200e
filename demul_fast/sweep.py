"""Moved: the paper's protocol is ``demul_fast.app.sweep``. This stub keeps the old names for
one release (``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.app.sweep": ("RESULTS_MD", "RESULTS_CSV", "PLOT_FILE", "ZEROSHOT_FILE", "METHOD", "ZS_METHOD",
                             "AVERAGE", "RUN_ONLY", "parse_ints", "run_folder", "run_state", "final_top1", "sweep",
                             "summarize", "markdown_table", "csv_table", "plot"),
    "demul_fast.app.runtime": ("MissingExtra",),
})
