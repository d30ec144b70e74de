"""Layer 0, core: pure building blocks with no knowledge of models or jobs.

errors, config (DiffusionConfig / DecodeConfig), atomic (the one atomic writer), masks (the BD3 mask rule), objective
(the BD3 loss as pure math), sampling (token choice and unmasking policies), cache (the block KV cache), media (safe
image loading), attention (backend choice), devices (default device / dtype), version. Modules here import only
each other and third-party packages. Nothing is imported here: import the module you need.
"""
