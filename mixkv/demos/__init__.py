"""The demos behind ``mixkv demo``: a long document (:mod:`.document_demo`) and a picture for the tiny VLM (:mod:`.image_demo`)."""
