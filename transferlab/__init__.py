"""transferlab: transfer-learning and adversarial-transferability studies."""

from transferlab._version import __version__
from transferlab.errors import UserError


def create_model(name, num_classes=10, in_channels=1, image_size=28, **options):
    """Build a model from the zoo by family name (see ``transferlab models``)."""
    from transferlab.models import create_model as _create  # lazy: import cost (torch, for `transferlab --help`)

    return _create(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options)


from transferlab.api import (  # noqa: E402
    Evaluation,
    MatrixTables,
    Run,
    attack_matrix,
    craft,
    evaluate,
    finetune,
    import_run,
    load_dataset,
    load_run,
    pretrain,
    run_study,
)

__all__ = ["UserError", "create_model", "__version__", "Run", "MatrixTables", "pretrain", "finetune",
           "attack_matrix", "run_study", "load_run", "load_dataset", "import_run", "craft", "evaluate", "Evaluation"]
