"""Stage 2: turn a (compressed) model into ONNX and ExecuTorch artifacts with parity checks."""
from pocketformer.export.exporters import FORMATS, ArtifactRecord, ExportConfig, export_model
from pocketformer.export.runtimes import load_sidecar, open_artifact

__all__ = ["FORMATS", "ArtifactRecord", "ExportConfig", "export_model", "load_sidecar", "open_artifact"]
