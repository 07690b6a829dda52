"""kvc.eval"""
