"""Wire formats: the seed API's and KServe V2's messages to and from the model's arrays, and
the protobuf wire reading they share."""
