"""Detectors: pure logic over samples of a guest kernel, yielding events with evidence."""
