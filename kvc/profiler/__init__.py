"""kvc.profiler"""
