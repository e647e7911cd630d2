"""Reports for humans: the trace page (replay a generation's unmasking order) and PNG plots."""
