"""placeholder until codegen lands"""
