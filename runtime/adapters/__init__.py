"""Drop-in replacements for the INSTRUCTOR integrations of LangChain, LlamaIndex, Haystack and Chroma.

One module per framework, each keeping the class, argument and method names of the integration it replaces, so
switching is one changed import:

| module | replaces | extra |
|---|---|---|
| ``runtime.adapters.langchain`` | ``langchain_community.embeddings.HuggingFaceInstructEmbeddings`` | ``[langchain]`` |
| ``runtime.adapters.llama_index`` | ``llama_index.embeddings.instructor.InstructorEmbedding`` | ``[llama-index]`` |
| ``runtime.adapters.haystack`` | ``InstructorTextEmbedder`` / ``InstructorDocumentEmbedder`` (instructor-embedders-haystack) | ``[haystack]`` |
| ``runtime.adapters.chroma`` | ``chromadb.utils.embedding_functions.InstructorEmbeddingFunction`` | ``[chroma]`` |

Each is backed by an exported engine file (``runtime.INSTRUCTOR``, no torch) or by a ``runtime.serve`` server
(``runtime.client``): see ``runtime.adapters.embedder``. Importing this package imports no framework; each module
imports its own framework, and says which extra installs it when it is missing. docs/integrations.md has the old
and new code side by side.
"""
