"""Scale-out for the pipeline: the Ray engine for batch stages, data parallelism for training stages."""
