"""Observing a run: the event stream read per owner (timeline), Perfetto traces, pictures, reports."""
