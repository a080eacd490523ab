"""The whole attack matrix in this process: every phase of :class:`Matrix`, with a progress bar."""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from transferlab.matrix.merge import Matrix
from transferlab.matrix.outputs import check_no_clobber
from transferlab.matrix.spec import MatrixResult, spec_from_keywords
from transferlab.tables import eps_text
from transferlab.training import progress_console


def run_matrix(*, progress: bool = True, craft_fn=None, force: bool = False, **arguments) -> MatrixResult:
    """Craft on every source (and, with ``white_box``, every target), evaluate every model in scope, write tidy
    tables: every phase of :class:`Matrix` in this process. Arguments: :func:`spec_from_keywords`'s (make_spec's,
    flat).

    ``craft_fn`` defaults to :func:`transferlab.attacks.craft`; tests pass a counting wrapper.
    ``force``: replace another matrix's results in ``out_dir`` (otherwise refused: transferlab.matrix.outputs).
    ``ensembles``: specs like 'pre_a,pre_b' (run names or directories among the sources and targets);
    each is one more crafter, on the mean of its members' logits (transferlab.ensemble).
    """
    started = time.perf_counter()
    spec = spec_from_keywords(**arguments)
    check_no_clobber(spec, force)  # before anything is written: another matrix's tables stay whole
    matrix = Matrix(spec, craft_fn)
    matrix.validate()
    crafters = matrix.crafters()
    progress_bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), disable=not progress, console=progress_console())
    with progress_bar:
        task = progress_bar.add_task("attack matrix", total=len(crafters) * len(spec.settings))
        for crafter in crafters:
            for setting in spec.settings:
                progress_bar.update(task, description=f"{setting.name} eps={eps_text(setting.eps)} on {crafter.name}")
                missing = [m for m in matrix.scope_of(crafter) if matrix.load_result(crafter, setting, m) is None]
                if missing:
                    matrix.evaluate_many(crafter, setting, missing, matrix.adversarial(crafter, setting))
                else:
                    matrix.count_reused(crafter, setting)  # every result on this set is already on disk
                progress_bar.advance(task)
    result = matrix.merge()
    result.seconds = time.perf_counter() - started
    return result
