"""cachefs: a read-only FUSE cache for S3 data sets on GPU training clusters."""

__version__ = "0.1.0"
