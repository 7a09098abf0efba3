"""Launch scripts: ``tpu.py`` (TPU VM slices), ``gpu.py`` (multi-host GPU over ssh), ``local.py`` (this machine)."""
