"""Devices and processes: the only place that decides where tensors live."""
