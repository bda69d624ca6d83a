"""Durable pipelines: a source, stages and a sink on the journal (DESIGN.md section 7)."""
