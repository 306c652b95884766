"""Where things are: locations, local directories opened once, and object stores.

Example:
    >>> from prefect_tensorflow.tasks.storage.locations import parse_location
    >>> parse_location("s3://team/models/iris", parameter="model_dir").scheme
    's3'
"""
