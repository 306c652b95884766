"""Shipping formats: the SavedModel export, the frozen graph, their signature and their verification.

Example:
    >>> from prefect_tensorflow.tasks.export.saved_model import ExportResult
    >>> ExportResult.__name__
    'ExportResult'
"""
