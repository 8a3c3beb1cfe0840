"""Reports: Markdown and PNG for a pipeline run (``report``) and for several runs side by
side (``compare``)."""
