"""kvc.compiler"""
