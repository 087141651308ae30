-- Argo CD health for ferry.dev/RefitJob (Lua 5.1, as Argo CD runs it).
-- Healthy: Complete. Degraded: Failed or invalid spec. Progressing otherwise.
local hs = {}
local function condition(obj, t)
  if obj.status == nil or obj.status.conditions == nil then return nil end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == t then return c end
  end
  return nil
end

if obj.status == nil or obj.status.observedGeneration == nil
    or obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the latest spec"
  return hs
end
local complete = condition(obj, "Complete")
local failed = condition(obj, "Failed")
local progressing = condition(obj, "Progressing")
if complete ~= nil and complete.status == "True" then
  hs.status = "Healthy"
  hs.message = complete.message
elseif failed ~= nil and failed.status == "True" then
  hs.status = "Degraded"
  hs.message = failed.reason .. ": " .. (failed.message or "")
elseif progressing ~= nil and progressing.reason == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = progressing.message
else
  hs.status = "Progressing"
  if progressing ~= nil then
    hs.message = progressing.reason .. ": " .. (progressing.message or "")
  else
    hs.message = "Waiting for the job to start"
  end
end
return hs
