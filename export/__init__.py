"""`vlp.export`: one file per target format (registry `EXPORTERS` in `base.py`), the writing
driver (`driver.py`). Importing this package registers every format in this folder."""

from vlp.core.registry import discover
from vlp.export.base import EXPORTERS, MODEL_CARD, Exporter, ExportError, RunConfig
from vlp.export.driver import export_model, read_export

__all__ = ["EXPORTERS", "MODEL_CARD", "ExportError", "Exporter", "RunConfig", "export_model", "read_export"]

discover(__name__)
